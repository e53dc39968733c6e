"""socks_filter's wire behaviour, spoken byte by byte by raw-socket clients.

Every test runs a real FilterServer (in this process on a thread, or as the socks_filter.py
command) and small upstream servers on 127.0.0.1; nothing leaves loopback except the lookup of a
name under .invalid, which is meant to fail. Every socket has a timeout and every wait is bounded;
nothing asserts on elapsed time.
"""

import ipaddress
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import unittest

import socks_filter
from tests.proxy_harness import (
    GREETING, REPO, SCRIPT, WAIT, ProxyTestCase, dial, echo_handler, free_port, http_handler,
    is_closed, loopback_rules, parse_address, raise_nofile, read_http_response, read_line,
    read_log, read_to_eof, recv_exact, reply_after_eof, send_then_read, socks4_ip, socks4a_name,
    socks5_open, socks5_request)


# ---------------------------------------------------------------------------------------------
# SOCKS5

class Socks5Test(ProxyTestCase):

    def setUp(self):
        super().setUp()
        self.echo = self.upstream(echo_handler)
        self.refused_port = free_port()
        self.proxy_ = self.proxy(f"127.0.0.1:{self.echo.port}", "nothing.invalid",
                                 f"127.0.0.1:{self.refused_port}")

    def assert_failure(self, request, code, greeting=GREETING):
        """The proxy answers `request` with a full 10-byte reply carrying `code`, then closes."""
        sock = self.connection(dial(self.proxy_.address))
        sock.sendall(greeting + request)
        self.assertEqual(recv_exact(sock, 2), b"\x05\x00")
        reply = recv_exact(sock, 10)
        self.assertEqual(len(reply), 10, f"short reply {reply!r}")
        self.assertEqual(reply[:4], bytes((5, code, 0, 1)), f"reply {reply.hex()}")
        self.assertTrue(is_closed(sock), "connection left open after a failure reply")

    def test_success_reply_carries_real_bound_address(self):
        """0x00 comes only after the upstream connect, with the address the upstream sees."""
        sock, reply = socks5_open(self.proxy_.address, "127.0.0.1", self.echo.port)
        self.connection(sock)
        self.assertEqual(len(reply), 10)
        self.assertEqual(reply[:4], b"\x05\x00\x00\x01")
        sock.sendall(b"ping")
        self.assertEqual(recv_exact(sock, 4), b"ping")
        peer = self.echo.records[0]["peer"]
        self.assertEqual((str(ipaddress.IPv4Address(reply[4:8])), struct.unpack("!H", reply[8:])[0]),
                         peer)

    def test_byte_by_byte_handshake(self):
        """Greeting and request split into single-byte segments still work."""
        sock = self.connection(dial(self.proxy_.address))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in GREETING:
            sock.send(bytes((byte,)))
            time.sleep(0.002)
        self.assertEqual(recv_exact(sock, 2), b"\x05\x00")
        for byte in socks5_request("127.0.0.1", self.echo.port):
            sock.send(bytes((byte,)))
            time.sleep(0.002)
        self.assertEqual(recv_exact(sock, 10)[:2], b"\x05\x00")
        sock.sendall(b"split")
        self.assertEqual(recv_exact(sock, 5), b"split")

    def test_early_data_after_request_reaches_upstream(self):
        """Bytes sent in the same segment right after the request belong to the tunnel."""
        sock, reply = socks5_open(self.proxy_.address, "127.0.0.1", self.echo.port, early=b"early bytes")
        self.connection(sock)
        self.assertEqual(reply[1], 0)
        self.assertEqual(recv_exact(sock, 11), b"early bytes")
        sock.shutdown(socket.SHUT_WR)
        self.assertTrue(is_closed(sock))
        self.assertEqual(self.echo.wait_done()[0]["data"], b"early bytes")

    def test_denied_name_gets_0x02(self):
        """A name no rule allows: 0x02, full length, closed; never connected anywhere."""
        self.assert_failure(socks5_request("denied.example.com", 80), 0x02)
        self.assertEqual(self.echo.records, [])

    def test_unlisted_ip_literal_gets_0x02(self):
        """An IPv4 literal (ATYP 1) passes only by an IP rule: another port of 127.0.0.1 is denied."""
        self.assert_failure(socks5_request("127.0.0.1", 9), 0x02)

    def test_lookup_failure_gets_0x04(self):
        """An allowed name that does not resolve: 0x04 (host unreachable)."""
        self.assert_failure(socks5_request("nothing.invalid", 80), 0x04)

    def test_refused_connect_gets_0x05(self):
        """An allowed address with nothing listening: 0x05 (connection refused)."""
        self.assert_failure(socks5_request("127.0.0.1", self.refused_port), 0x05)

    def test_bind_and_udp_associate_get_0x07(self):
        """Only CONNECT is supported: BIND (2) and UDP ASSOCIATE (3) get 0x07."""
        for command in (2, 3):
            with self.subTest(command=command):
                self.assert_failure(socks5_request("127.0.0.1", self.echo.port, command), 0x07)

    def test_bad_address_type_gets_0x08(self):
        """ATYP other than 1, 3, 4 gets 0x08."""
        for atyp in (0, 2, 5):
            with self.subTest(atyp=atyp):
                self.assert_failure(bytes((5, 1, 0, atyp)) + b"\x7f\0\0\x01\0\x50", 0x08)

    def test_malformed_request_gets_0x01(self):
        """A request with a non-zero reserved byte gets 0x01 (general failure)."""
        self.assert_failure(b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", 0x01)

    def test_no_acceptable_method(self):
        """A greeting offering only username/password gets 05 FF and is closed."""
        sock = self.connection(dial(self.proxy_.address))
        sock.sendall(b"\x05\x01\x02")
        self.assertEqual(recv_exact(sock, 2), b"\x05\xff")
        self.assertTrue(is_closed(sock))

    def test_name_resolving_to_loopback_needs_an_ip_rule(self):
        """ATYP 3 'localhost' allowed by a name rule is still refused (0x02) for its loopback
        address, --allow-private or not: that opens only the private-use networks."""
        proxy = self.proxy(f"localhost:{self.echo.port}", allow_private=True)
        sock = self.connection(dial(proxy.address))
        sock.sendall(GREETING + socks5_request("localhost", self.echo.port))
        self.assertEqual(recv_exact(sock, 12), b"\x05\x00\x05\x02\x00\x01" + b"\0" * 6)
        self.assertTrue(is_closed(sock))
        records = read_log(self.log, 1, lambda r: r["host"] == "localhost")
        self.assertIn("private-address", [r["reason"] for r in records if r["host"] == "localhost"])

    def test_name_with_an_ip_rule_for_its_address(self):
        """ATYP 3 'localhost' with a name rule and an IP rule for loopback connects and relays."""
        proxy = self.proxy(f"localhost:{self.echo.port}/raw", *loopback_rules(self.echo.port))
        sock, reply = socks5_open(proxy.address, "localhost", self.echo.port, early=b"hi")
        self.connection(sock)
        self.assertEqual(reply[:2], b"\x05\x00")
        self.assertEqual(recv_exact(sock, 2), b"hi")

    def test_ip_spelled_as_name(self):
        """ATYP 3 names that spell 127.0.0.1 (127.1, 0x7f.0.0.1, 2130706433) are that IP literal:
        allowed by the IP rule, connected to 127.0.0.1 without DNS, logged as 127.0.0.1."""
        for spelling in ("127.1", "0x7f.0.0.1", "2130706433"):
            with self.subTest(spelling=spelling):
                sock, reply = socks5_open(self.proxy_.address, spelling, self.echo.port, early=b"ip")
                self.connection(sock)
                self.assertEqual(reply[1], 0)
                self.assertEqual(recv_exact(sock, 2), b"ip")
        hosts = {r["host"] for r in read_log(self.log) if r["event"] == "decision"}
        self.assertEqual(hosts, {"127.0.0.1"})

    def test_name_case_and_trailing_dot(self):
        """'LOCALHOST.' matches the rule for localhost and is logged canonically."""
        # /raw: a plain name rule logs its decision only once the ClientHello came
        proxy = self.proxy(f"localhost:{self.echo.port}/raw", *loopback_rules(self.echo.port))
        sock, reply = socks5_open(proxy.address, "LOCALHOST.", self.echo.port)
        self.connection(sock)
        self.assertEqual(reply[1], 0)
        records = read_log(self.log, 1, lambda r: r["event"] == "decision")
        self.assertEqual([r["host"] for r in records if r["event"] == "decision"], ["localhost"])

    def test_ipv6_literal(self):
        """ATYP 4 ::1 allowed by an [::1]:PORT rule gets a 0x00 reply with an IPv6 bound address."""
        try:
            listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            listener.bind(("::1", 0))
        except OSError:
            self.skipTest("no IPv6 loopback here")
        self.addCleanup(listener.close)
        listener.listen(1)
        listener.settimeout(WAIT)
        port = listener.getsockname()[1]
        proxy = self.proxy(f"[::1]:{port}")
        sock = self.connection(dial(proxy.address))
        sock.sendall(GREETING + socks5_request("::1", port) + b"six")
        upstream, peer = listener.accept()
        self.addCleanup(upstream.close)
        self.assertEqual(recv_exact(sock, 2), b"\x05\x00")
        reply = recv_exact(sock, 22)
        self.assertEqual(reply[:4], b"\x05\x00\x00\x04")
        self.assertEqual(str(ipaddress.IPv6Address(reply[4:20])), peer[0])
        self.assertEqual(struct.unpack("!H", reply[20:22])[0], peer[1])
        upstream.settimeout(WAIT)
        self.assertEqual(recv_exact(upstream, 3), b"six")


# ---------------------------------------------------------------------------------------------
# SOCKS4 and SOCKS4a

class Socks4Test(ProxyTestCase):

    def setUp(self):
        super().setUp()
        self.echo = self.upstream(echo_handler)

    def test_socks4_ip_allowed_by_ip_rule(self):
        """SOCKS4 to 127.0.0.1 with an IP rule: 0x5A, then the tunnel relays (early data included)."""
        proxy = self.proxy(f"127.0.0.1:{self.echo.port}")
        sock = self.connection(dial(proxy.address))
        sock.sendall(socks4_ip("127.0.0.1", self.echo.port) + b"four")
        reply = recv_exact(sock, 8)
        self.assertEqual(reply[:2], b"\x00\x5a")
        self.assertEqual(recv_exact(sock, 4), b"four")

    def test_socks4_ip_without_rule_rejected(self):
        """SOCKS4 with only an address is an IP literal: no IP rule, 0x5B and closed."""
        proxy = self.proxy("localhost", allow_private=True)
        sock = self.connection(dial(proxy.address))
        sock.sendall(socks4_ip("127.0.0.1", self.echo.port))
        self.assertEqual(recv_exact(sock, 8), b"\x00\x5b" + b"\0" * 6)
        self.assertTrue(is_closed(sock))

    def test_socks4a_name_allowed(self):
        """SOCKS4a (DSTIP 0.0.0.1 + name) to an allowed name relays, logged as proto socks4a."""
        proxy = self.proxy(f"localhost:{self.echo.port}/raw", *loopback_rules(self.echo.port))
        sock = self.connection(dial(proxy.address))
        sock.sendall(socks4a_name(b"localhost", self.echo.port) + b"4a")
        self.assertEqual(recv_exact(sock, 8)[:2], b"\x00\x5a")
        self.assertEqual(recv_exact(sock, 2), b"4a")
        records = read_log(self.log, 1)
        self.assertEqual([(r["proto"], r["host"], r["decision"]) for r in records][:1],
                         [("socks4a", "localhost", "allow")])

    def test_socks4a_name_denied(self):
        """SOCKS4a to a name no rule allows: 0x5B, closed."""
        proxy = self.proxy(f"localhost:{self.echo.port}", allow_private=True)
        sock = self.connection(dial(proxy.address))
        sock.sendall(socks4a_name(b"denied.example.com", self.echo.port))
        self.assertEqual(recv_exact(sock, 8)[:2], b"\x00\x5b")
        self.assertTrue(is_closed(sock))

    def test_socks4_byte_by_byte(self):
        """A SOCKS4a request arriving one byte at a time is still understood."""
        proxy = self.proxy(f"localhost:{self.echo.port}", *loopback_rules(self.echo.port))
        sock = self.connection(dial(proxy.address))
        for byte in socks4a_name(b"localhost", self.echo.port):
            sock.send(bytes((byte,)))
            time.sleep(0.002)
        self.assertEqual(recv_exact(sock, 8)[:2], b"\x00\x5a")


# ---------------------------------------------------------------------------------------------
# HTTP: CONNECT and absolute-form

class HttpTest(ProxyTestCase):

    def setUp(self):
        super().setUp()
        self.echo = self.upstream(echo_handler)
        self.web = self.upstream(http_handler(b"hello from upstream\n"))
        self.proxy_ = self.proxy(f"127.0.0.1:{self.echo.port}", f"127.0.0.1:{self.web.port}")

    def send(self, data):
        sock = self.connection(dial(self.proxy_.address))
        sock.sendall(data)
        return sock

    def test_connect_200_then_tunnel(self):
        """CONNECT gets '200 Connection established', then a raw tunnel; early data kept."""
        sock = self.send(f"CONNECT 127.0.0.1:{self.echo.port} HTTP/1.1\r\n"
                         f"Host: 127.0.0.1:{self.echo.port}\r\n\r\nearly".encode())
        expected = b"HTTP/1.1 200 Connection established\r\n\r\n"
        self.assertEqual(recv_exact(sock, len(expected)), expected)
        self.assertEqual(recv_exact(sock, 5), b"early")
        sock.sendall(b"\x00\xffbinary")
        self.assertEqual(recv_exact(sock, 8), b"\x00\xffbinary")

    def test_connect_byte_by_byte(self):
        """A CONNECT head trickled one byte at a time is accepted."""
        sock = self.connection(dial(self.proxy_.address))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in f"CONNECT 127.0.0.1:{self.echo.port} HTTP/1.1\r\n\r\n".encode():
            sock.send(bytes((byte,)))
            time.sleep(0.001)
        self.assertEqual(recv_exact(sock, 12), b"HTTP/1.1 200")

    def test_connect_denied_403_body(self):
        """A denied CONNECT gets 403 with a plain-text body naming host, port and the allow rule."""
        sock = self.send(b"CONNECT Denied.Example.COM:443 HTTP/1.1\r\nHost: denied.example.com:443\r\n\r\n")
        status, headers, body = read_http_response(sock)
        self.assertEqual(status, 403)
        self.assertTrue(headers.get("content-type", "").startswith("text/plain"), headers)
        self.assertEqual(int(headers["content-length"]), len(body))
        text = body.decode()
        self.assertIn("denied.example.com:443", text)
        self.assertIn("allow rule 'denied.example.com:443'", text)

    def test_connect_refused_upstream_502(self):
        """CONNECT to an allowed address with nothing listening gets an HTTP error, not 200."""
        port = free_port()
        proxy = self.proxy(f"127.0.0.1:{port}")
        sock = self.connection(dial(proxy.address))
        sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        status, _, body = read_http_response(sock)
        self.assertEqual(status, 502)
        self.assertIn(b"connect-refused", body)

    def test_malformed_requests_400(self):
        """Malformed heads get 400 and are closed."""
        cases = [
            b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n",                       # no port
            b"GET /relative HTTP/1.1\r\nHost: x.example.com\r\n\r\n",   # origin form to a proxy
            b"CONNECT a.example.com:443 HTTP/1.1\r\nbad header\r\n\r\n",
            b"CONNECT a.example.com:443 HTTP/1.1 extra\r\n\r\n",
            b"CONNECT a.example.com:99999 HTTP/1.1\r\n\r\n",
            b"CONNECT a.example.com:443 HTTP/1.1\r\nHost: b.example.com:443\r\n\r\n",
            b"CONNECT a.example.com:443 HTTP/1.1\r\nHost: a.example.com\r\nHost: b.example.com\r\n\r\n",
            b"GET http://user@a.example.com/ HTTP/1.1\r\n\r\n",
        ]
        for request in cases:
            with self.subTest(request=request):
                status, _, body = read_http_response(self.send(request))
                self.assertEqual(status, 400)
                self.assertTrue(body.startswith(b"socks_filter:"), body)

    def test_oversize_head_431(self):
        """A head larger than MAX_HEAD_BYTES with no end in sight gets 431."""
        size = socks_filter.MAX_HEAD_BYTES + 600
        head = b"CONNECT a.example.com:443 HTTP/1.1\r\nX-Filler: "
        sock = self.send(head + b"a" * (size - len(head)))
        status, _, _ = read_http_response(sock)
        self.assertEqual(status, 431)

    def test_absolute_form_forwarded_in_origin_form(self):
        """GET http://... goes upstream as 'GET /path', without hop-by-hop or Proxy-* headers."""
        port = self.web.port
        sock = self.send(
            f"GET http://127.0.0.1:{port}/some/path?q=1 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "User-Agent: raw-test\r\n"
            "Proxy-Connection: keep-alive\r\n"
            "Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==\r\n"
            "Connection: keep-alive, X-Private-Hop\r\n"
            "X-Private-Hop: hop\r\n"
            "Keep-Alive: timeout=5\r\n"
            "TE: trailers\r\n"
            "Upgrade: websocket\r\n"
            "X-End-To-End: kept\r\n\r\n".encode())
        status, _, body = read_http_response(sock)
        self.assertEqual(status, 200)
        self.assertEqual(body, b"hello from upstream\n")
        received = self.web.wait_done()[0]["data"].decode()
        lines = received.split("\r\n")
        self.assertEqual(lines[0], "GET /some/path?q=1 HTTP/1.1")
        names = {line.partition(":")[0].lower(): line.partition(":")[2].strip()
                 for line in lines[1:] if line}
        self.assertEqual(names.get("host"), f"127.0.0.1:{port}")
        self.assertEqual(names.get("user-agent"), "raw-test")
        self.assertEqual(names.get("x-end-to-end"), "kept")
        for removed in ("proxy-connection", "proxy-authorization", "x-private-hop", "keep-alive",
                        "te", "upgrade"):
            self.assertNotIn(removed, names, received)
        self.assertNotEqual(names.get("connection", "").lower(), "keep-alive")

    def test_absolute_form_drops_every_proxy_header(self):
        """Headers named Proxy-* (not only the standard ones) are not forwarded upstream."""
        port = self.web.port
        sock = self.send(f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                         "Proxy-Token: secret-for-the-proxy\r\n\r\n".encode())
        status, _, _ = read_http_response(sock)
        self.assertEqual(status, 200)
        received = self.web.wait_done()[0]["data"].decode().lower()
        self.assertNotIn("proxy-token", received)

    def test_pipelined_second_request_not_forwarded(self):
        """Only one absolute-form request per connection goes upstream; a pipelined one is dropped."""
        port = self.web.port
        sock = self.send(f"GET http://127.0.0.1:{port}/first HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
                         "GET http://denied.example.com/second HTTP/1.1\r\n"
                         "Host: denied.example.com\r\n\r\n".encode())
        status, _, body = read_http_response(sock)
        self.assertEqual((status, body), (200, b"hello from upstream\n"))
        received = self.web.wait_done()[0]["data"]
        self.assertTrue(received.startswith(b"GET /first HTTP/1.1\r\n"), received)
        self.assertNotIn(b"second", received)
        self.assertEqual(len(self.web.records), 1)

    def test_bare_lf_head_400(self):
        """A head with bare LF line ends is malformed: 400 at once, not a silent drop at the deadline."""
        saved = socks_filter.HANDSHAKE_TIMEOUT
        socks_filter.HANDSHAKE_TIMEOUT = 1.0
        self.addCleanup(setattr, socks_filter, "HANDSHAKE_TIMEOUT", saved)
        proxy = self.proxy(f"127.0.0.1:{self.web.port}")
        sock = self.connection(dial(proxy.address))
        sock.sendall(f"GET http://127.0.0.1:{self.web.port}/ HTTP/1.1\nHost: 127.0.0.1\n\n".encode())
        self.assertEqual(read_http_response(sock)[0], 400)

    def test_denied_post_with_body_still_gets_403(self):
        """A denied absolute-form POST whose body the proxy never reads still gets its 403
        (the proxy must not reset the connection under the unread body)."""
        body = b"x" * 100000
        sock = self.connection(dial(self.proxy_.address))
        sock.sendall(f"POST http://denied.example.com/form HTTP/1.1\r\nHost: denied.example.com\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        sock.shutdown(socket.SHUT_WR)
        try:
            status = read_http_response(sock)[0]
        except ConnectionResetError:
            status = "connection reset"
        self.assertEqual(status, 403)

    def test_absolute_form_with_body(self):
        """A POST body of Content-Length bytes is forwarded exactly, even when sent after the head."""
        port = self.web.port
        body = os.urandom(3000).hex().encode()
        sock = self.send(f"POST http://127.0.0.1:{port}/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        sock.sendall(body[100:])
        status, _, _ = read_http_response(sock)
        self.assertEqual(status, 200)
        received = self.web.wait_done()[0]["data"]
        self.assertTrue(received.startswith(b"POST /upload HTTP/1.1\r\n"), received[:100])
        self.assertTrue(received.endswith(b"\r\n\r\n" + body))

    def test_absolute_form_host_mismatch_400(self):
        """A Host header naming another host than the URL gets 400, and nothing goes upstream."""
        port = self.web.port
        sock = self.send(f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: evil.example.com\r\n\r\n".encode())
        status, _, _ = read_http_response(sock)
        self.assertEqual(status, 400)
        self.assertEqual(self.web.records, [])

    def test_absolute_form_denied_403(self):
        """GET http://denied.example.com/ gets 403 naming the host and port 80."""
        sock = self.send(b"GET http://denied.example.com/x HTTP/1.1\r\nHost: denied.example.com\r\n\r\n")
        status, headers, body = read_http_response(sock)
        self.assertEqual(status, 403)
        self.assertIn(b"denied.example.com:80", body)
        self.assertEqual(headers.get("connection"), "close")

    def test_https_url_in_absolute_form_400(self):
        """GET https://... (not CONNECT) is refused with 400."""
        sock = self.send(b"GET https://a.example.com/ HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        self.assertEqual(read_http_response(sock)[0], 400)


# ---------------------------------------------------------------------------------------------
# Half-close, timeouts, limits, load

class RelayTest(ProxyTestCase):

    def test_client_half_close_still_gets_full_reply(self):
        """Client SHUT_WR reaches the upstream as EOF, and the whole reply still comes back
        intact even though the client does not read for a while (the proxy must hold back)."""
        payload = os.urandom(4 << 20)
        upstream = self.upstream(reply_after_eof(payload))
        proxy = self.proxy(f"127.0.0.1:{upstream.port}")
        sock = self.connection(dial(proxy.address))
        sock.sendall(f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\n\r\nquestion".encode())
        sock.shutdown(socket.SHUT_WR)
        time.sleep(0.3)
        head = b"HTTP/1.1 200 Connection established\r\n\r\n"
        self.assertEqual(recv_exact(sock, len(head)), head)
        self.assertEqual(read_to_eof(sock), payload)
        self.assertEqual(upstream.wait_done()[0]["data"], b"question")

    def test_upstream_half_close_reaches_client(self):
        """Upstream SHUT_WR reaches the client as EOF, and the client can still send afterwards."""
        upstream = self.upstream(send_then_read(b"server says bye"))
        proxy = self.proxy(f"127.0.0.1:{upstream.port}")
        sock, reply = socks5_open(proxy.address, "127.0.0.1", upstream.port)
        self.connection(sock)
        self.assertEqual(reply[1], 0)
        self.assertEqual(read_to_eof(sock), b"server says bye")
        sock.sendall(b"client still talking")
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(upstream.wait_done()[0]["data"], b"client still talking")
        self.assertTrue(is_closed(sock))

    def test_silent_and_stalled_clients_dropped(self):
        """A client that sends nothing, or stops mid-handshake, is closed after the handshake deadline."""
        saved = socks_filter.HANDSHAKE_TIMEOUT
        socks_filter.HANDSHAKE_TIMEOUT = 0.3
        self.addCleanup(setattr, socks_filter, "HANDSHAKE_TIMEOUT", saved)
        proxy = self.proxy("127.0.0.1")
        for start in (b"", b"\x05", b"\x05\x01\x00\x05\x01", b"CONNECT 127.0.0.1:"):
            with self.subTest(start=start):
                sock = self.connection(dial(proxy.address))
                sock.sendall(start)
                if start.startswith(b"\x05\x01\x00"):
                    self.assertEqual(recv_exact(sock, 2), b"\x05\x00")
                self.assertTrue(is_closed(sock))
        self.assertFalse(proxy.server.connections)

    def test_trickling_client_dropped(self):
        """A client sending one byte of an endless head now and then is dropped at the deadline."""
        saved = socks_filter.HANDSHAKE_TIMEOUT
        socks_filter.HANDSHAKE_TIMEOUT = 0.5
        self.addCleanup(setattr, socks_filter, "HANDSHAKE_TIMEOUT", saved)
        proxy = self.proxy("127.0.0.1")
        sock = self.connection(dial(proxy.address))
        sock.sendall(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nX-Slow: ")
        dropped = False
        for _ in range(200):                    # bounded: up to ~10 s of trickling
            try:
                sock.send(b"a")
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
            if select.select([sock], [], [], 0.05)[0]:
                dropped = is_closed(sock)
                break
        self.assertTrue(dropped, "a trickling client was never dropped")

    def test_connection_limit(self):
        """Over max_connections a client gets a proper refusal, and the proxy serves again later."""
        echo = self.upstream(echo_handler)
        proxy = self.proxy(f"127.0.0.1:{echo.port}", max_connections=2)
        tunnels = []
        for _ in range(2):
            sock, reply = socks5_open(proxy.address, "127.0.0.1", echo.port)
            tunnels.append(self.connection(sock))
            self.assertEqual(reply[1], 0)
            sock.sendall(b"x")
            self.assertEqual(recv_exact(sock, 1), b"x")
        sock, reply = socks5_open(proxy.address, "127.0.0.1", echo.port)
        self.connection(sock)
        self.assertEqual(len(reply), 10)
        self.assertEqual(reply[:2], b"\x05\x01")
        self.assertTrue(is_closed(sock))
        sock = self.connection(dial(proxy.address))
        sock.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
        self.assertEqual(read_http_response(sock)[0], 503)
        for tunnel in tunnels:
            tunnel.close()
        served = False
        for _ in range(100):                    # bounded: the proxy notices the closes quickly
            sock, reply = socks5_open(proxy.address, "127.0.0.1", echo.port)
            sock.close()
            if reply[1] == 0:
                served = True
                break
            time.sleep(0.05)
        self.assertTrue(served, "proxy did not serve again after the other connections closed")
        reasons = [r["reason"] for r in read_log(self.log, 1,
                                                 lambda r: r["reason"] == "too-many-connections")]
        self.assertIn("too-many-connections", reasons)

    def test_handshaking_client_evicted_at_limit(self):
        """At the limit, a client still in its handshake makes room for a new one (which is served)."""
        echo = self.upstream(echo_handler)
        proxy = self.proxy(f"127.0.0.1:{echo.port}", max_connections=1)
        idle = self.connection(dial(proxy.address))
        idle.sendall(GREETING)
        self.assertEqual(recv_exact(idle, 2), b"\x05\x00")     # accepted, waiting for a request
        sock, reply = socks5_open(proxy.address, "127.0.0.1", echo.port, early=b"new")
        self.connection(sock)
        self.assertEqual(reply[1], 0)
        self.assertEqual(recv_exact(sock, 3), b"new")
        self.assertTrue(is_closed(idle))

    def test_500_simultaneous_connections(self):
        """500 tunnels open at once through one daemon each echo their own bytes."""
        count = 500
        raise_nofile(self, 4 * count + 256)
        echo = self.upstream(echo_handler)
        daemon = self.daemon("--listen", "127.0.0.1:0", "--allow", f"127.0.0.1:{echo.port}")
        request = GREETING + socks5_request("127.0.0.1", echo.port)
        socks = []
        try:
            for i in range(count):
                sock = dial(daemon.address)
                socks.append(sock)
                sock.sendall(request + b"conn-%04d" % i)
            for i, sock in enumerate(socks):
                self.assertEqual(recv_exact(sock, 12)[:3], b"\x05\x00\x05", f"connection {i}")
                self.assertEqual(recv_exact(sock, 9), b"conn-%04d" % i)
        finally:
            for sock in socks:
                sock.close()
        self.assertEqual(len(echo.records), count)
        self.assertIsNone(daemon.process.poll())


# ---------------------------------------------------------------------------------------------
# The JSON log and audit mode

class LogTest(ProxyTestCase):

    def test_decision_and_close_records(self):
        """Allowed: a decision and a close record with address, byte counts, duration; denied: decision only."""
        upstream = self.upstream(reply_after_eof(b"d" * 1000))
        proxy = self.proxy(f"127.0.0.1:{upstream.port}")
        sock, reply = socks5_open(proxy.address, "127.0.0.1", upstream.port, early=b"1234567")
        self.connection(sock)
        self.assertEqual(reply[1], 0)
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(read_to_eof(sock), b"d" * 1000)
        sock, reply = socks5_open(proxy.address, "denied.example.com", 443)
        self.connection(sock)
        self.assertEqual(reply[1], 2)
        records = read_log(self.log, 1, lambda r: r["event"] == "close")
        allowed = [r for r in records if r["host"] == "127.0.0.1"]
        denied = [r for r in records if r["host"] == "denied.example.com"]
        self.assertEqual([r["event"] for r in allowed], ["decision", "close"])
        decision, close = allowed
        for record in records:
            self.assertIsInstance(record["ts"], float)
            self.assertIsInstance(record["id"], int)
            self.assertEqual(record["proto"], "socks5")
        self.assertEqual((decision["decision"], decision["reason"], decision["mode"], decision["port"]),
                         ("allow", "allowed-by-rule", "enforce", upstream.port))
        self.assertEqual(close["id"], decision["id"])
        self.assertEqual((close["decision"], close["reason"]), ("allow", "closed"))
        self.assertEqual(close["address"], f"127.0.0.1:{upstream.port}")
        self.assertEqual((close["bytes_up"], close["bytes_down"]), (7, 1000))
        self.assertGreaterEqual(close["duration"], 0)
        self.assertEqual([(r["event"], r["decision"], r["reason"], r["port"]) for r in denied],
                         [("decision", "deny", "not-in-allowlist", 443)])
        self.assertNotIn("enforced", denied[0])

    def test_proto_names(self):
        """The log names each protocol: socks5, socks4a, http-connect, http."""
        web = self.upstream(http_handler(b"ok"))
        proxy = self.proxy()
        target = f"denied.example.com:{web.port}"
        requests = [
            GREETING + socks5_request("denied.example.com", web.port),
            socks4a_name(b"denied.example.com", web.port),
            f"CONNECT {target} HTTP/1.1\r\n\r\n".encode(),
            f"GET http://{target}/ HTTP/1.1\r\n\r\n".encode(),
        ]
        for request in requests:
            sock = self.connection(dial(proxy.address))
            sock.sendall(request)
            self.assertTrue(read_to_eof(sock))
        records = read_log(self.log, 4)
        self.assertEqual([r["proto"] for r in records], ["socks5", "socks4a", "http-connect", "http"])
        self.assertEqual({(r["host"], r["port"], r["decision"]) for r in records},
                         {("denied.example.com", web.port, "deny")})

    def test_lookup_failure_logged(self):
        """An allowed name that fails to resolve logs decision allow and close reason lookup-failed."""
        proxy = self.proxy("nothing.invalid")
        sock, reply = socks5_open(proxy.address, "nothing.invalid", 80)
        self.connection(sock)
        self.assertEqual(reply[1], 4)
        records = read_log(self.log, 1, lambda r: r["event"] == "close")
        self.assertEqual([(r["event"], r["decision"], r["reason"]) for r in records],
                         [("decision", "allow", "allowed-by-rule"), ("close", "allow", "lookup-failed")])

    def test_audit_mode(self):
        """Audit lets an unlisted name through (logged deny + enforced false); a deny rule still blocks."""
        echo = self.upstream(echo_handler)
        proxy = self.proxy(*loopback_rules(echo.port), deny=["blocked.example.com"], mode="audit")
        sock, reply = socks5_open(proxy.address, "localhost", echo.port, early=b"audit")
        self.connection(sock)
        self.assertEqual(reply[1], 0)
        self.assertEqual(recv_exact(sock, 5), b"audit")
        sock, reply = socks5_open(proxy.address, "blocked.example.com", 80)
        self.connection(sock)
        self.assertEqual(reply[1], 2)
        records = read_log(self.log, 2, lambda r: r["event"] == "decision")
        decisions = {r["host"]: r for r in records if r["event"] == "decision"}
        audited = decisions["localhost"]
        self.assertEqual((audited["decision"], audited["reason"], audited["mode"], audited.get("enforced")),
                         ("deny", "not-in-allowlist", "audit", False))
        blocked = decisions["blocked.example.com"]
        self.assertEqual((blocked["decision"], blocked["reason"]), ("deny", "denied-by-rule"))
        self.assertNotIn("enforced", blocked)

    def test_audit_mode_keeps_private_check(self):
        """Without allow_private, audit mode still refuses a name that resolves to loopback."""
        echo = self.upstream(echo_handler)
        proxy = self.proxy(mode="audit")
        for host in ("localhost", "127.0.0.1"):
            with self.subTest(host=host):
                sock, reply = socks5_open(proxy.address, host, echo.port)
                self.connection(sock)
                self.assertEqual(reply[1], 2)
        self.assertEqual(echo.records, [])
        reasons = {r["reason"] for r in read_log(self.log, 2)}
        self.assertEqual(reasons, {"private-address"})


# ---------------------------------------------------------------------------------------------
# The command: unix socket, errors, signals, parent death

def run_command(*args):
    """socks_filter.py run to completion (it is expected to exit at once)."""
    return subprocess.run([sys.executable, SCRIPT, *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=WAIT, cwd=REPO)


class CommandTest(ProxyTestCase):

    def sock_path(self):
        return os.path.join(self.tmp, "proxy.sock")

    def test_unwritable_ready_fd_is_one_line_and_leaves_no_socket(self):
        """A ready pipe whose reader has gone: exit 1, one line, the socket file removed."""
        ready_read, ready_write = os.pipe()
        os.close(ready_read)
        result = subprocess.run([sys.executable, SCRIPT, "--listen", self.sock_path(),
                                 "--ready-fd", str(ready_write)], pass_fds=(ready_write,),
                                capture_output=True, text=True, timeout=WAIT)
        os.close(ready_write)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("ready line", result.stderr)
        self.assertFalse(os.path.lexists(self.sock_path()))

    def test_non_utf8_socket_path_is_reported_as_bytes(self):
        """A socket path that is not UTF-8 comes back on the ready line byte for byte."""
        path = os.path.join(os.fsencode(self.tmp), b"\xff.sock")
        ready_read, ready_write = os.pipe()
        proc = subprocess.Popen([sys.executable, SCRIPT, "--listen", os.fsdecode(path),
                                 "--ready-fd", str(ready_write)], pass_fds=(ready_write,),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        os.close(ready_write)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait(WAIT)))
        with os.fdopen(ready_read, "rb") as ready:
            self.assertEqual(ready.readline(), b"ready " + path + b"\n")
        proc.terminate()
        _, err = proc.communicate(timeout=WAIT)
        self.assertEqual(proc.returncode, 0, err)
        self.assertNotIn(b"Traceback", err)
        self.assertFalse(os.path.lexists(path))

    def assert_refused_to_start(self, result):
        self.assertEqual(result.returncode, 2, result.stderr)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith("socks_filter.py: error: "), lines[0])
        self.assertNotIn("Traceback", result.stderr)

    def test_ready_line_reports_real_tcp_ports(self):
        """--listen 127.0.0.1:0 (and [::1]:0) are reported with the ports bound, then --ready-fd is
        closed; every listed address serves."""
        echo = self.upstream(echo_handler)
        listens = ["--listen", "127.0.0.1:0"]
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
            listens += ["--listen", "[::1]:0"]
        except OSError:
            pass                                # no IPv6 loopback here: IPv4 only
        ready_read, ready_write = os.pipe()
        proc = subprocess.Popen([sys.executable, SCRIPT, *listens, "--allow", f"127.0.0.1:{echo.port}",
                                 "--ready-fd", str(ready_write)], pass_fds=(ready_write,),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        os.close(ready_write)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait(WAIT)))
        self.addCleanup(os.close, ready_read)
        line = read_line(ready_read).decode()
        self.assertEqual(read_line(ready_read), b"", "--ready-fd left open after the ready line")
        words = line.split()
        self.assertEqual(words[0], "ready")
        self.assertEqual(len(words), 1 + len(listens) // 2, line)
        self.assertTrue(words[1].startswith("127.0.0.1:"), line)
        for word in words[1:]:
            address = parse_address(word)
            self.assertNotEqual(address[1], 0, line)
            sock, reply = socks5_open(address, "127.0.0.1", echo.port, early=b"tcp")
            self.connection(sock)
            self.assertEqual(recv_exact(sock, 3), b"tcp")

    def test_unix_socket_mode_0600_and_serves(self):
        """The unix socket is created 0600 and serves SOCKS5 and HTTP alike."""
        echo = self.upstream(echo_handler)
        path = self.sock_path()
        daemon = self.daemon("--listen", path, "--allow", f"127.0.0.1:{echo.port}")
        self.assertEqual(daemon.addresses, [path])
        info = os.lstat(path)
        self.assertTrue(stat.S_ISSOCK(info.st_mode))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o600)
        sock, reply = socks5_open(path, "127.0.0.1", echo.port, early=b"unix")
        self.connection(sock)
        self.assertEqual(recv_exact(sock, 4), b"unix")
        sock = self.connection(dial(path))
        sock.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
        self.assertEqual(recv_exact(sock, 12), b"HTTP/1.1 200")

    def test_stale_socket_replaced(self):
        """A socket file nobody listens on is replaced."""
        path = self.sock_path()
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        os.chmod(path, 0o666)
        daemon = self.daemon("--listen", path, "--allow", "127.0.0.1")
        self.assertEqual(daemon.addresses, [path])
        sock = self.connection(dial(path))
        sock.sendall(GREETING)
        self.assertEqual(recv_exact(sock, 2), b"\x05\x00")
        info = os.lstat(path)
        self.assertTrue(stat.S_ISSOCK(info.st_mode))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o600)

    def test_live_socket_not_stolen(self):
        """A socket another running proxy listens on is refused (exit 2), and that proxy keeps it."""
        path = self.sock_path()
        self.daemon("--listen", path, "--allow", "127.0.0.1")
        self.assert_refused_to_start(run_command("--listen", path, "--allow", "127.0.0.1"))
        sock = self.connection(dial(path))
        sock.sendall(GREETING)
        self.assertEqual(recv_exact(sock, 2), b"\x05\x00")

    def test_non_socket_at_path_refused(self):
        """A regular file, a symlink or a directory at the path: exit 2, one line, left untouched."""
        target = os.path.join(self.tmp, "target")
        with open(target, "w") as handle:
            handle.write("keep me")
        for kind in ("file", "symlink", "dangling-symlink", "directory"):
            with self.subTest(kind=kind):
                path = os.path.join(self.tmp, kind + ".sock")
                if kind == "file":
                    with open(path, "w") as handle:
                        handle.write("keep me")
                elif kind == "symlink":
                    os.symlink(target, path)
                elif kind == "dangling-symlink":
                    os.symlink(os.path.join(self.tmp, "nowhere"), path)
                else:
                    os.mkdir(path)
                before = os.lstat(path)
                self.assert_refused_to_start(run_command("--listen", path, "--allow", "127.0.0.1"))
                after = os.lstat(path)
                self.assertEqual((after.st_ino, after.st_mode), (before.st_ino, before.st_mode))
        with open(target) as handle:
            self.assertEqual(handle.read(), "keep me")

    def test_bad_rules_and_arguments_exit_2(self):
        """Unusable rules and arguments: exit 2, one line naming the problem, no traceback."""
        path = self.sock_path()
        rule_file = os.path.join(self.tmp, "rules")
        with open(rule_file, "w") as handle:
            handle.write("# fine\napi.example.com\n*.com\n")
        cases = [
            ["--allow", "*"],
            ["--allow", "*.com"],
            ["--allow", "com"],
            ["--allow", "bad name.example.com"],
            ["--allow", "example.com:70000"],
            ["--allow", "0.0.0.0/0"],
            ["--deny", "[::1"],
            ["--allow-file", rule_file],
            ["--allow-file", os.path.join(self.tmp, "missing")],
            ["--mode", "loose"],
            ["--max-connections", "0"],
            ["--ready-fd", "999"],
            ["--log", os.path.join(self.tmp, "no-such-dir", "log")],
        ]
        for extra in cases:
            with self.subTest(args=extra):
                result = run_command("--listen", path, *extra)
                self.assert_refused_to_start(result)
                self.assertFalse(os.path.exists(path))
        result = run_command("--listen", path, "--allow-file", rule_file)
        self.assertIn(f"{rule_file}:3", result.stderr)
        for listen in ("localhost:80", "127.0.0.1", os.path.join(self.tmp, "x" * 120)):
            with self.subTest(listen=listen):
                self.assert_refused_to_start(run_command("--listen", listen, "--allow", "127.0.0.1"))

    def test_sigterm_exits_0_with_summary(self):
        """SIGTERM: exit 0, socket file removed, one summary line naming the denied hosts."""
        path = self.sock_path()
        echo = self.upstream(echo_handler)
        daemon = self.daemon("--listen", path, "--allow", f"127.0.0.1:{echo.port}")
        sock, reply = socks5_open(path, "127.0.0.1", echo.port, early=b"open")
        self.connection(sock)
        self.assertEqual(reply[1], 0)
        self.assertEqual(recv_exact(sock, 4), b"open")
        for host in ("denied.example.com", "also-denied.example.org"):
            denied, reply = socks5_open(path, host, 443)
            denied.close()
            self.assertEqual(reply[1], 2)
        code, stderr = daemon.stop(signal.SIGTERM), daemon.stderr()
        self.assertEqual(code, 0)
        self.assertFalse(os.path.lexists(path))
        lines = stderr.splitlines()
        self.assertEqual(len(lines), 1, stderr)
        self.assertIn("1 allowed", lines[0])
        self.assertIn("2 denied", lines[0])
        self.assertIn("denied.example.com:443", lines[0])
        self.assertIn("also-denied.example.org:443", lines[0])
        self.assertTrue(is_closed(sock), "open tunnel not closed at shutdown")
        closes = daemon.records("close")
        self.assertEqual([(r["host"], r["bytes_up"], r["bytes_down"]) for r in closes],
                         [("127.0.0.1", 4, 4)])

    def test_sigint_exits_0(self):
        """SIGINT stops it like SIGTERM: exit 0, socket removed, no traceback."""
        path = self.sock_path()
        daemon = self.daemon("--listen", path, "--allow", "127.0.0.1")
        code, stderr = daemon.stop(signal.SIGINT), daemon.stderr()
        self.assertEqual(code, 0)
        self.assertFalse(os.path.lexists(path))
        self.assertNotIn("Traceback", stderr)

    def test_exits_when_parent_dies(self):
        """Killing the process that started the daemon makes the daemon stop and remove its socket."""
        path = self.sock_path()
        parent_code = ("import subprocess, sys\n"
                       "child = subprocess.Popen(sys.argv[1:])\n"
                       "print(child.pid, flush=True)\n"
                       "child.wait()\n")
        parent = subprocess.Popen([sys.executable, "-c", parent_code, sys.executable, SCRIPT,
                                   "--listen", path, "--allow", "127.0.0.1"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL)
        self.addCleanup(parent.stdout.close)
        self.addCleanup(lambda: parent.poll() is None and (parent.kill(), parent.wait(WAIT)))
        pid = int(read_line(parent.stdout.fileno()))
        self.addCleanup(kill_if_alive, pid)
        self.assertEqual(read_line(parent.stdout.fileno()).decode(), f"ready {path}\n")
        self.assertTrue(process_alive(pid))
        parent.kill()
        parent.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(process_alive(pid), "daemon outlived its parent")
        self.assertFalse(os.path.lexists(path))


class ListenFdTest(ProxyTestCase):
    """--listen-fd: a socket the caller bound and made listen (bw_lib hands the proxy its
    socket so that bwrap need not wait): served as it is, refused unless it is a listening
    unix stream socket on a --listen path, its path left to the caller."""

    def bound(self, name="proxy.sock", listening=True):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        path = os.path.join(self.tmp, name)
        sock.bind(path)
        if listening:
            sock.listen(16)
        return sock, path

    def start(self, fd, *args):
        ready_read, ready_write = os.pipe()
        proc = subprocess.Popen([sys.executable, SCRIPT, *args, "--listen-fd", str(fd),
                                 "--ready-fd", str(ready_write)], pass_fds=(fd, ready_write),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        os.close(ready_write)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait(WAIT)))
        return proc, ready_read

    def test_a_handed_socket_is_served_and_its_path_left_to_the_caller(self):
        sock, path = self.bound()
        early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # waits in the backlog
        self.addCleanup(early.close)
        early.settimeout(WAIT)
        early.connect(path)
        early.sendall(GREETING)
        proc, ready_read = self.start(sock.fileno(), "--listen", path, "--allow", "127.0.0.1")
        sock.close()
        with os.fdopen(ready_read, "rb") as ready:
            self.assertEqual(ready.readline(), b"ready " + os.fsencode(path) + b"\n")
        self.assertEqual(recv_exact(early, 2), b"\x05\x00")
        proc.terminate()
        _, err = proc.communicate(timeout=WAIT)
        self.assertEqual(proc.returncode, 0, err)
        self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode), "the caller's path was removed")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late:
            late.settimeout(WAIT)
            with self.assertRaises(ConnectionRefusedError):   # gone with the proxy
                late.connect(path)

    def test_anything_but_a_listening_socket_on_a_listen_path_is_refused(self):
        other, other_path = self.bound("other.sock")
        idle, idle_path = self.bound("idle.sock", listening=False)
        pipe_read, pipe_write = os.pipe()
        self.addCleanup(os.close, pipe_read)
        self.addCleanup(os.close, pipe_write)
        path = os.path.join(self.tmp, "proxy.sock")
        for what, fd, listen in (("a pipe", pipe_read, path),
                                 ("a socket on another path", other.fileno(), path),
                                 ("a socket that does not listen", idle.fileno(), idle_path)):
            with self.subTest(what):
                proc, ready_read = self.start(fd, "--listen", listen)
                _, err = proc.communicate(timeout=WAIT)
                with os.fdopen(ready_read, "rb") as ready:
                    self.assertEqual(ready.read(), b"", "it said ready")
                self.assertEqual(proc.returncode, 2, err)
                self.assertIn("--listen-fd", err)
                self.assertEqual(len(err.splitlines()), 1, err)
                self.assertFalse(os.path.lexists(path))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:   # still the caller's
            probe.settimeout(WAIT)
            probe.connect(other_path)


def process_alive(pid):
    """True while `pid` runs (a zombie waiting for its new parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_if_alive(pid):
    if process_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    unittest.main()
