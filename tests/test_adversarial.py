"""Attacks on socks_filter.py over real sockets: each test is an escape or a denial of service that
would work against a naive filtering proxy, and asserts that it does not work against this one.

Everything runs on loopback (or in a network namespace a test creates with `unshare -rn`). Test
upstreams count every connection they accept: a "denied" upstream that counts one connection is
an escape, whatever the proxy logged.

    BypassOverTheWireTest      names and addresses that reach loopback, private networks or
                               another site in disguise, through SOCKS5, SOCKS4a, CONNECT, GET
    HeaderInjectionTest        CR/LF/NUL in targets and Host, host:port@evil, Host vs URL
    SmugglingTest              pipelined and Content-Length/Transfer-Encoding smuggling
    Socks5NameLengthTest       SOCKS5 names of length 0, 253, 255 (and SOCKS4a over-long)
    SlowlorisTest              stalls and drips in every handshake state (in-process server)
    HalfOpenTest               2000 connections that send nothing
    BackPressureTest           clients that never read while upstreams send 200 MB
    ConnectionFloodTest        floods over --max-connections; refusals, no spinning
    DescriptorExhaustionTest   the proxy out of file descriptors (RLIMIT_NOFILE 128)
    OutputInjectionTest        terminal escapes and forged lines in names -> stderr and log
    BoundedStateTest           thousands of distinct denied names do not grow the proxy's memory
    SniCheckTest               TLS ClientHello server name check, SNI-stage stalls, and DNS
                               rebinding (port 443 and a fake DNS server in a private netns)
    FuzzTest                   3000 mutated SOCKS4/5 and HTTP handshakes, fixed seed
    HelloRetryTest             a second ClientHello for another site after a TLS 1.3
                               HelloRetryRequest, against a real `openssl s_server`
    ServerAnswerTest           a server that answers a checked ClientHello with anything but TLS

Names that must resolve to loopback (loop.example.com, ...) come from a private /etc/hosts that
`unshare -rm` bind-mounts for the proxy alone (proxy_harness.HOSTS): no DNS traffic leaves the
machine. Without user namespaces those tests skip, and fail under CI=true.
"""

import json
import os
import queue
import random
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from concurrent.futures import ThreadPoolExecutor

import socks_filter
from tests.proxy_harness import (
    CCS, HRR_RANDOM, LOOP, NAMESERVER, P256, PROMPT, REPO, Flood, ProxyProcess,
    ProxyTestCase, Upstream, attempts_for, authority, built_client_hello, client_hello, dial,
    echo_handler, echo_through, exchange, granted, hold_handler, http_connect, http_get,
    key_share_hello, namespace_prefix, raise_nofile, read_until, read_until_closed,
    record_handler, recv_exact, refused, require_tool, skip_or_fail, socks4_ip, socks4a_name, socks5_ip,
    socks5_name)


# ---------------------------------------------------------------------------------------------

class BypassOverTheWireTest(ProxyTestCase):
    """Every way to name loopback, a private network or another site in disguise, through every
    protocol: the loopback upstream must never be reached."""

    # name -> the reasons a denial may give
    NAMES = {
        b"x.example.com.evil.net": {"not-in-allowlist"},
        b"evilexample.com": {"not-in-allowlist"},
        b"example.com.evil.net": {"not-in-allowlist"},
        b"xexample.com": {"not-in-allowlist"},
        b"example.com\n": {"bad-name", "bad-request"},
        b"example.com\r\n": {"bad-name", "bad-request"},
        b"localhost\x00.example.com": {"bad-name", "bad-request"},
        b"localhost\x00": {"bad-name", "bad-request"},
        b"local host": {"bad-name", "bad-request"},
        b"localhost%00.example.com": {"bad-name", "bad-request"},
        b"*.example.com": {"bad-name", "bad-request"},
        b"example.com..": {"bad-name", "bad-request"},
        b"127.1": {"private-address"},
        b"0x7f.1": {"private-address"},
        b"2130706433": {"private-address"},
        b"0x7f000001": {"private-address"},
        b"0177.0.0.1": {"private-address"},
        b"017700000001": {"private-address"},
        b"127.0.0.1.": {"private-address"},
        b"0.0.0.0": {"private-address"},
        b"0": {"private-address"},
        b"[::ffff:127.0.0.1]": {"private-address"},
        b"[::ffff:7f00:1]": {"private-address"},
        b"[64:ff9b::7f00:1]": {"private-address"},
        b"[2002:7f00:1::]": {"private-address"},
        b"[::1]": {"private-address"},
        b"[::]": {"private-address"},
        b"[::127.0.0.1]": {"private-address"},
        b"localhost": {"not-in-allowlist"},
        # allowed names (by *.example.com) whose addresses are loopback, private or wrapped
        b"loop.example.com": {"private-address"},
        b"LOOP.Example.COM.": {"private-address"},
        b"loop6.example.com": {"private-address"},
        b"mapped.example.com": {"private-address"},
        b"nat64.example.com": {"private-address"},
        b"sixtofour.example.com": {"private-address"},
        b"metadata.example.com": {"platform-endpoint"},
        b"lan.example.com": {"private-address"},
        b"zero.example.com": {"private-address"},
        b"mixed.example.com": {"private-address"},     # one public, one loopback address
    }

    def plan(self, port):
        """(host, proto, payload, reasons it may be denied for) for every name and address."""
        plan = []
        for host, reasons in self.NAMES.items():
            for proto, payload in attempts_for(host, port):
                if proto == "socks4a" and b"\x00" in host:
                    # SOCKS4a ends the name at the NUL: the proxy sees (and decides on) "localhost"
                    reasons = reasons | {"not-in-allowlist"}
                plan.append((host, proto, payload, reasons))
            if host.startswith(b"["):
                plan.append((host, "socks5", socks5_name(host[1:-1], port), reasons))
        for address in ("127.0.0.1", "0.0.0.0", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1",
                        "2002:7f00:1::"):
            plan.append((address.encode(), "socks5", socks5_ip(address, port), {"private-address"}))
        for address in ("127.0.0.1", "0.0.0.0", "127.255.255.254"):
            plan.append((address.encode(), "socks4a", socks4_ip(address, port), {"private-address"}))
        return plan

    def test_bypass_classes_never_reach_loopback(self):
        target = self.upstream(record_handler())
        proxy = self.daemon("--allow", "example.com", "--allow", "*.example.com", hosts=True)
        plan = self.plan(target.port)
        for host, proto, payload, reasons in plan:
            with self.subTest(host=host, proto=proto, payload=payload[:60]):
                answer, closed = exchange(proxy.port, payload)
                self.assertTrue(closed, "proxy left a denied request hanging")
                self.assertTrue(refused(proto, answer), f"not a proper refusal: {answer[:200]!r}")
        decisions = proxy.records()
        self.assertEqual(len(decisions), len(plan))
        for (host, proto, payload, reasons), record in zip(plan, decisions):
            with self.subTest(host=host, proto=proto, record=record):
                self.assertEqual(record["decision"], "deny")
                self.assertIn(record["reason"], reasons)
        self.assertEqual([r for r in proxy.records("close") if r["reason"] == "lookup-failed"], [],
                         "a denied name was looked up")
        self.assert_alive(proxy)
        self.assertEqual(target.accepted, 0, "the loopback upstream was reached")

    def test_audit_mode_still_refuses_private_and_bad_names(self):
        """--mode audit lets unlisted destinations through; never loopback, private or bad names."""
        target = self.upstream(record_handler())
        port = target.port
        proxy = self.daemon("--allow", "example.com", "--mode", "audit", hosts=True)
        hosts = [b"localhost", b"loop.example.com", b"LOOP.Example.COM.", b"mapped.example.com",
                 b"nat64.example.com", b"metadata.example.com", b"lan.example.com", b"zero.example.com",
                 b"mixed.example.com", b"127.1", b"0x7f.1", b"2130706433", b"0177.0.0.1", b"0.0.0.0",
                 b"[::ffff:127.0.0.1]", b"[::1]", b"localhost\x00.example.com", b"example.com\n"]
        count = 0
        for host in hosts:
            for proto, payload in attempts_for(host, port):
                with self.subTest(host=host, proto=proto):
                    answer, closed = exchange(proxy.port, payload)
                    self.assertTrue(closed)
                    self.assertTrue(refused(proto, answer), answer[:200])
                    count += 1
        denials = [r for r in proxy.records() if r["decision"] == "deny" and r.get("enforced", True)]
        self.assertEqual(len(denials), count)
        self.assertEqual(target.accepted, 0, "audit mode let a request reach loopback")
        self.assert_alive(proxy)

    def test_canonical_spellings_of_allowed_destinations_pass(self):
        """The positive control: the same wire paths DO reach the upstream when a rule allows it,
        so the denials above are the policy and not a broken test harness."""
        target = self.upstream(echo_handler)
        port = target.port
        # /raw: the echo stream is not TLS (a plain name rule would close it, see SniCheckTest)
        proxy = self.daemon("--allow", f"loop.example.com:{port}/raw", "--allow", f"127.0.0.1:{port}",
                            "--allow", f"mapped.example.com:{port}/raw", "--allow-private", hosts=True)
        plan = []
        for host in (b"loop.example.com", b"LOOP.Example.COM.", b"127.1", b"0x7f.1", b"2130706433",
                     b"0177.0.0.1", b"[::ffff:127.0.0.1]"):
            for proto, payload in attempts_for(host, port, ("socks5", "socks4a", "http-connect")):
                plan.append((host, proto, payload))
        plan.append((b"127.0.0.1", "socks5", socks5_ip("127.0.0.1", port)))
        plan.append((b"127.0.0.1", "socks4a", socks4_ip("127.0.0.1", port)))
        for host, proto, payload in plan:
            with self.subTest(host=host, proto=proto):
                self.assertTrue(echo_through(proxy.port, payload, proto))
        for host in (b"Loop.Example.Com.", b"127.1"):
            answer, closed = exchange(proxy.port, http_get(authority(host, port)))
            self.assertTrue(answer.startswith(b"HTTP/1.0 200"), answer[:200])
        self.assertEqual(target.accepted, len(plan) + 2)
        # --allow-private and an IP rule for 127.0.0.1 still do not open 0.0.0.0 or other ports
        before = target.accepted
        for payload, proto in ((socks5_name(b"0.0.0.0", port), "socks5"),
                               (socks5_name(b"0", port), "socks5"),
                               (socks5_name(b"zero.example.com", port), "socks5"),
                               (socks5_name(b"loop.example.com", port + 1 if port < 65535 else 1), "socks5"),
                               (http_connect(authority(b"127.0.0.2", port)), "http")):
            answer, _ = exchange(proxy.port, payload)
            self.assertTrue(refused(proto, answer), answer[:200])
        self.assertEqual(target.accepted, before)


class HeaderInjectionTest(ProxyTestCase):
    """CR/LF/NUL in CONNECT targets and Host headers, junk after the port, Host vs URL."""

    def test_injected_heads_are_refused_before_any_connection(self):
        allowed = self.upstream(record_handler(reply=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
        denied = self.upstream(record_handler())
        a = f"127.0.0.1:{allowed.port}".encode()
        d = f"127.0.0.1:{denied.port}".encode()
        proxy = self.daemon("--allow", a.decode())
        heads = [
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: " + a + b"\rX-Injected: 1\r\n\r\n",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: " + a + b"\nHost: " + d + b"\r\n\r\n",
            b"CONNECT " + a + b"\nHost: " + d + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b"\r\nCONNECT " + d + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b"\x00 HTTP/1.1\r\n\r\n",
            b"CONNECT 127.0.0.1\x00.example.com:" + str(allowed.port).encode() + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: " + a + b"\x00.evil\r\n\r\n",
            b"CONNECT " + a + b"@" + d + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + d + b"@" + a + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b"#@" + d + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b"/@" + d + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b":" + str(denied.port).encode() + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b" " + d + b" HTTP/1.1\r\n\r\n",
            b"CONNECT http://" + a + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: 127.0.0.2:" + str(allowed.port).encode() + b"\r\n\r\n",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: " + a + b"\r\nHost: " + d + b"\r\n\r\n",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: " + a + b"\r\n " + d + b"\r\n\r\n",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost : " + d + b"\r\n\r\n",
            # absolute-form
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: " + d + b"\r\n\r\n",
            b"GET http://" + d + b"/ HTTP/1.1\r\nHost: " + a + b"\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: evil.example.net\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\nHost: " + d + b"\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\nHost: " + d + b"\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\nX-A: 1\x00\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\nX-A: 1\rGET / HTTP/1.1\r\n\r\n",
            b"GET http://" + a + b"/\r\nHost: " + d + b" HTTP/1.1\r\n\r\n",
            b"GET http://" + a + b"/\tx HTTP/1.1\r\nHost: " + a + b"\r\n\r\n",
            b"GET http://" + a + b"@" + d + b"/ HTTP/1.1\r\nHost: " + d + b"\r\n\r\n",
            b"GET http://" + d + b"@" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\n\r\n",
            b"GET http://" + a + b"#@" + d + b"/ HTTP/1.1\r\n\r\n",
            b"GET http://" + a + b"\\@" + d + b"/ HTTP/1.1\r\n\r\n",
            b"GET http://" + a + b"\x00/ HTTP/1.1\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n",
            b"GET /relative HTTP/1.1\r\nHost: " + a + b"\r\n\r\n",
            b"GET https://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/2.0\r\nHost: " + a + b"\r\n\r\n",
            b"GET  http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\n\r\n",
        ]
        for head in heads:
            with self.subTest(head=head[:120]):
                answer, closed = exchange(proxy.port, head)
                self.assertTrue(closed)
                self.assertRegex(answer[:12], rb"^HTTP/1\.1 4\d\d", answer[:300])
                self.assertIn(b"X-Proxy-Error", answer)
        self.assertEqual(allowed.accepted, 0, "a malformed head reached the allowed upstream")
        self.assertEqual(denied.accepted, 0, "a malformed head reached a denied upstream")
        # positive control: the clean request goes through, with Host rewritten from the URL
        answer, _ = exchange(proxy.port, http_get(a, b"/clean", b"Connection: keep-alive\r\n"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:200])
        received = allowed.next_record()
        self.assertTrue(received.startswith(b"GET /clean HTTP/1.1\r\nHost: " + a + b"\r\n"), received)
        self.assertIn(b"Connection: close\r\n", received)
        self.assertNotIn(b"keep-alive", received)
        self.assertEqual(denied.accepted, 0)
        self.assert_alive(proxy)


class SmugglingTest(ProxyTestCase):
    """A second request hidden behind the first must not reach any upstream."""

    REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"

    def setUp(self):
        super().setUp()
        self.allowed = self.upstream(record_handler(reply=self.REPLY, idle=0.6))
        self.denied = self.upstream(record_handler(reply=self.REPLY))
        self.a = f"127.0.0.1:{self.allowed.port}".encode()
        self.d = f"127.0.0.1:{self.denied.port}".encode()
        self.proxy_ = self.daemon("--allow", self.a.decode())

    def forwarded(self, payload, later=b""):
        """Send payload (and `later` after a pause), return (answer, what the upstream got)."""
        with dial(self.proxy_.port, PROMPT) as sock:
            sock.sendall(payload)
            if later:
                time.sleep(0.2)
                try:
                    sock.sendall(later)
                except OSError:
                    pass
            answer, closed = read_until_closed(sock, 12)
        self.assertTrue(closed)
        return answer, self.allowed.next_record()

    def assert_single_request(self, received, *forbidden):
        self.assertEqual(received.count(b" HTTP/1.1\r\n"), 1, received)
        for text in forbidden:
            self.assertNotIn(text, received)

    def test_pipelined_requests(self):
        first = http_get(self.a, b"/one")
        cases = [
            (first + http_get(self.d, b"/two"), b""),
            (first + b"GET /two HTTP/1.1\r\nHost: evil.example.net\r\n\r\n", b""),
            (first + http_get(self.a, b"/two", b"Host: x\r\n"), b""),
            (first, b"GET /two HTTP/1.1\r\nHost: evil.example.net\r\n\r\n"),
            (first, http_get(self.d, b"/two")),
        ]
        for payload, later in cases:
            with self.subTest(payload=payload, later=later):
                answer, received = self.forwarded(payload, later)
                self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
                self.assert_single_request(received, b"/two", b"evil", b"http://" + self.d,
                                           b"Host: " + self.d + b"\r\n")
        self.assertEqual(self.allowed.accepted, len(cases))
        self.assertEqual(self.denied.accepted, 0)

    def test_request_after_response_on_kept_alive_connection(self):
        with dial(self.proxy_.port, PROMPT) as sock:
            sock.sendall(http_get(self.a, b"/one", b"Connection: keep-alive\r\n"))
            answer = b""
            while not answer.endswith(b"ok"):
                chunk = sock.recv(4096)
                self.assertTrue(chunk, answer)
                answer += chunk
            try:
                sock.sendall(http_get(self.d, b"/two") + b"GET /three HTTP/1.1\r\nHost: evil\r\n\r\n")
            except OSError:
                pass
            rest, closed = read_until_closed(sock, 12)
        self.assertTrue(closed)
        self.assertEqual(rest, b"")
        self.assert_single_request(self.allowed.next_record(), b"/two", b"/three")
        self.assertEqual(self.allowed.accepted, 1)
        self.assertEqual(self.denied.accepted, 0)

    def test_content_length_bounds_the_body(self):
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: evil.example.net\r\n\r\n"
        head = (b"POST http://" + self.a + b"/one HTTP/1.1\r\nHost: " + self.a
                + b"\r\nContent-Length: 5\r\n\r\n")
        answer, received = self.forwarded(head + b"hello" + smuggled)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        self.assertTrue(received.endswith(b"\r\n\r\nhello"), received)
        self.assert_single_request(received, b"smuggled", b"evil")
        head0 = (b"POST http://" + self.a + b"/one HTTP/1.1\r\nHost: " + self.a
                 + b"\r\nContent-Length: 0\r\n\r\n")
        answer, received = self.forwarded(head0, smuggled)
        self.assert_single_request(received, b"smuggled", b"evil")
        self.assertTrue(received.endswith(b"\r\n\r\n"), received)

    def test_conflicting_framing_is_refused(self):
        base = b"POST http://" + self.a + b"/one HTTP/1.1\r\nHost: " + self.a + b"\r\n"
        body = b"0\r\n\r\nGET http://" + self.d + b"/x HTTP/1.1\r\nHost: " + self.d + b"\r\n\r\n"
        heads = [
            base + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            base + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            base + b"Transfer-Encoding: chunked\r\n\r\n",
            base + b"Transfer-Encoding:\tchunked\r\n\r\n",
            base + b"Transfer-Encoding: identity, chunked\r\n\r\n",
            base + b"transfer-encoding: CHUNKED\r\n\r\n",
            base + b"Transfer-Encoding : chunked\r\n\r\n",
            base + b"Transfer-Encoding\x0b: chunked\r\n\r\n",
            base + b"Content-Length: 5\r\nContent-Length: 50\r\n\r\n",
            base + b"Content-Length: 5, 50\r\n\r\n",
            base + b"Content-Length: +5\r\n\r\n",
            base + b"Content-Length: -1\r\n\r\n",
            base + b"Content-Length: 0x5\r\n\r\n",
            base + b"Content-Length: 5 5\r\n\r\n",
        ]
        for head in heads:
            with self.subTest(head=head):
                answer, closed = exchange(self.proxy_.port, head + body)
                self.assertTrue(closed)
                self.assertRegex(answer[:12], rb"^HTTP/1\.1 4(00|11)", answer[:300])
        self.assertEqual(self.allowed.accepted, 0)
        self.assertEqual(self.denied.accepted, 0)
        self.assert_alive(self.proxy_)


class Socks5NameLengthTest(ProxyTestCase):
    def test_name_lengths(self):
        target = self.upstream(record_handler())
        proxy = self.daemon("--allow", "*.example.com")
        long253 = (".".join(["a" * 63] * 3 + ["b" * 49]) + ".example.com").encode()
        self.assertEqual(len(long253), 253)
        long255 = (".".join(["a" * 63] * 3 + ["b" * 51]) + ".example.com").encode()
        self.assertEqual(len(long255), 255)
        dotted254 = long253 + b"."
        cases = [
            (socks5_name(b"", target.port), "bad-name", ""),
            (socks5_name(long255, target.port), "bad-name", None),
            (socks5_name(b"\xff" * 255, target.port), "bad-name", None),
            (socks5_name(b"." * 255, target.port), "bad-name", None),
            # 253 bytes is a legal name; it is parsed whole (not truncated) and checked as such
            (socks5_name(long253.replace(b"example", b"exbmple"), target.port), "not-in-allowlist",
             long253.replace(b"example", b"exbmple").decode()),
            (socks5_name(dotted254.replace(b"example", b"exbmple"), target.port), "not-in-allowlist",
             long253.replace(b"example", b"exbmple").decode()),
            (socks4a_name(b"a" * 300, target.port), "bad-request", ""),
        ]
        for payload, reason, host in cases:
            with self.subTest(payload=payload[:40], reason=reason):
                answer, closed = exchange(proxy.port, payload)
                self.assertTrue(closed)
                proto = "socks5" if payload[0] == 5 else "socks4a"
                self.assertTrue(refused(proto, answer), answer)
                record = proxy.records()[-1]
                self.assertEqual((record["decision"], record["reason"]), ("deny", reason))
                if host is not None:
                    self.assertEqual(record["host"], host)
        # length 0 followed by bytes that look like a second request: nothing is reached
        answer, closed = exchange(proxy.port, socks5_name(b"", target.port)
                                  + b"\x05\x01\x00\x03\x09localhost" + struct.pack("!H", target.port))
        self.assertTrue(closed)
        self.assertTrue(refused("socks5", answer[:12]), answer)
        # a declared length longer than what is sent, then EOF: closed, nothing reached
        with dial(proxy.port, PROMPT) as sock:
            sock.sendall(b"\x05\x01\x00\x05\x01\x00\x03\xffabc")
            sock.shutdown(socket.SHUT_WR)
            answer, closed = read_until_closed(sock)
        self.assertTrue(closed)
        self.assertEqual(answer, b"\x05\x00")
        self.assertEqual(target.accepted, 0)
        self.assert_alive(proxy)


# ---------------------------------------------------------------------------------------------
# Denial of service

class SlowlorisTest(ProxyTestCase):
    """Stalls and drips in every handshake state, against a proxy in this process whose
    HANDSHAKE_TIMEOUT and CLOSING_TIMEOUT are 1 s."""

    def setUp(self):
        super().setUp()
        for name in ("HANDSHAKE_TIMEOUT", "CLOSING_TIMEOUT"):
            self.addCleanup(setattr, socks_filter, name, getattr(socks_filter, name))
            setattr(socks_filter, name, 1.0)
        self.target = self.upstream(echo_handler)
        self.proxy_ = self.proxy(f"127.0.0.1:{self.target.port}")
        self.good = socks5_ip("127.0.0.1", self.target.port)

    def stalls(self):
        """A handshake cut short in every state, by name."""
        p = struct.pack("!H", self.target.port)
        return {
            "connected, silent": b"",
            "socks5 greeting, 1 byte": b"\x05",
            "socks5 greeting, methods missing": b"\x05\x02\x00",
            "socks5 request, partial name": b"\x05\x01\x00" + b"\x05\x01\x00\x03\x20abc",
            "socks5 request, partial ipv4": b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00",
            "socks5 request, no port": b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01",
            "socks4, partial header": b"\x04\x01" + p,
            "socks4, user id not ended": b"\x04\x01" + p + b"\x7f\x00\x00\x01user",
            "socks4a, name not ended": b"\x04\x01" + p + b"\x00\x00\x00\x01\x00localh",
            "http, one letter": b"C",
            "http, head not ended": b"CONNECT 127.0.0.1:" + str(self.target.port).encode() + b" HTTP/1.1\r\nHost: 1",
            "http, absolute-form not ended": b"GET http://127.0.0.1/ HTTP/1.1\r\n",
        }

    def drips(self):
        """Handshakes sent one byte at a time, by name."""
        p = struct.pack("!H", self.target.port)
        return {
            "drip socks5 request": b"\x05\x01\x00\x05\x01\x00\x03\xff" + b"a" * 255,
            "drip socks4a name": b"\x04\x01" + p + b"\x00\x00\x00\x01\x00" + b"a" * 250,
            "drip http head": b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 400,
            # refused at once (denied destination / malformed), then keeps talking slowly
            "drip after a refusal": b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n" + b"a" * 400,
            "drip after a malformed request": b"\x05\x01\x00\x05\x09" + b"a" * 400,
        }

    def drip(self, payload):
        """One byte every 0.15 s; True when the proxy closed the connection for good (a send
        fails), not merely half-closed it after a refusal."""
        eof = False
        with dial(self.proxy_.port, PROMPT) as sock:
            for i in range(len(payload)):     # at most ~60 s, far beyond the 1 s timeouts
                try:
                    sock.sendall(payload[i:i + 1])
                except socket.timeout:
                    return False
                except OSError:
                    return True
                if eof:
                    time.sleep(0.15)
                    continue
                if select.select([sock], [], [], 0.15)[0]:
                    try:
                        eof = not sock.recv(4096)
                    except OSError:
                        return True
        return False

    def assert_served_and_clean(self):
        """A good client is served, no connection is left in the server, and it still runs."""
        self.assertTrue(echo_through(self.proxy_.port, self.good))
        server = self.proxy_.server
        deadline = time.monotonic() + 5
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(len(server.connections), 0, "connections leaked in the server")
        self.assertIsNone(self.proxy_.error)
        self.assertTrue(self.proxy_.thread.is_alive())

    def test_stalled_handshakes_are_dropped_and_others_served(self):
        sockets = {}
        for name, payload in self.stalls().items():
            sockets[name] = self.connection(dial(self.proxy_.port, PROMPT))
            if payload:
                sockets[name].sendall(payload)
        drips = self.drips()
        dropped = dict.fromkeys(drips, False)

        def run(name):
            dropped[name] = self.drip(drips[name])
        threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in drips]
        for thread in threads:
            thread.start()
        # while every state is stalled, a well-behaved client is served
        self.assertTrue(echo_through(self.proxy_.port, self.good))
        self.assertTrue(echo_through(self.proxy_.port,
                                     http_connect(f"127.0.0.1:{self.target.port}".encode()), "http"))
        for name, sock in sockets.items():
            with self.subTest(state=name):
                answer, closed = read_until_closed(sock, 8)
                self.assertTrue(closed, f"{name}: still open long after the handshake timeout")
                self.assertIn(answer, (b"", b"\x05\x00"))
        for thread in threads:
            thread.join(60)
            self.assertFalse(thread.is_alive())
        for name in drips:
            with self.subTest(state=name):
                self.assertTrue(dropped[name], f"{name}: a byte-at-a-time client was never dropped")
        self.assert_served_and_clean()

    def test_a_refused_client_that_keeps_sending_is_cut_off(self):
        """Cut off by MAX_DRAIN_BYTES or the closing timeout: it does not get to stream into the
        proxy forever."""
        with dial(self.proxy_.port, PROMPT) as sock:
            sock.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n")
            cut = False
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    sock.sendall(b"x" * 65536)
                except socket.timeout:
                    continue
                except OSError:
                    cut = True
                    break
        self.assertTrue(cut, "a refused client could keep sending for 20 s")
        self.assert_served_and_clean()


class HalfOpenTest(ProxyTestCase):
    """2000 clients that connect and send nothing."""

    COUNT = 2000

    def open_idle(self, port):
        raise_nofile(self, self.COUNT + 512)
        idle = []
        self.addCleanup(lambda: [s.close() for s in idle])
        for _ in range(self.COUNT):
            idle.append(dial(port, PROMPT))
        return idle

    def test_half_open_under_the_limit(self):
        target = self.upstream(echo_handler)
        proxy = self.daemon("--allow", f"127.0.0.1:{target.port}", "--max-connections", "4096")
        idle = self.open_idle(proxy.port)
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", target.port)))
        self.assertTrue(echo_through(proxy.port, http_connect(f"127.0.0.1:{target.port}".encode()), "http"))
        self.assertGreater(proxy.fd_count(), self.COUNT, "the idle connections were not held open")
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 10
        while proxy.fd_count() > 100 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertLess(proxy.fd_count(), 100, "descriptors of closed clients were not released")
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", target.port)))
        self.assert_alive(proxy)

    def test_half_open_over_the_limit_slots_are_reclaimed(self):
        """Default limit (1024): silent clients are dropped (evicted by newcomers, or at the
        handshake timeout, 2 s here), a client arriving meanwhile gets an answer or a close
        (never a hang), and the proxy serves again afterwards."""
        target = self.upstream(echo_handler)
        proxy = self.daemon("--allow", f"127.0.0.1:{target.port}", handshake_timeout=2.0)
        idle = self.open_idle(proxy.port)
        answer, closed = exchange(proxy.port, socks5_ip("127.0.0.1", target.port), timeout=10)
        self.assertTrue(closed or granted("socks5", answer), answer)
        self.assertTrue(granted("socks5", answer) or refused("socks5", answer) or answer == b"", answer)
        for sock in idle[:50]:
            _, closed = read_until_closed(sock, 10)
            self.assertTrue(closed)
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", target.port)))
        self.assert_alive(proxy)

    def test_half_open_over_the_limit_good_client_served_meanwhile(self):
        """With the default limit, 2000 silent connections must not hold every slot for
        HANDSHAKE_TIMEOUT: a well-behaved client arriving meanwhile is served (the proxy evicts
        the oldest connection still in its handshake)."""
        target = self.upstream(echo_handler)
        proxy = self.daemon("--allow", f"127.0.0.1:{target.port}")
        self.open_idle(proxy.port)
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", target.port)),
                        "a good client was refused while silent connections held every slot")


    def test_lingering_refusals_do_not_hold_slots(self):
        """Clients that get a refusal, read it, and then neither close nor send: they are done,
        and must not keep a well-behaved client out (--max-connections 16, 40 such clients)."""
        target = self.upstream(echo_handler)
        denied = self.upstream(record_handler())
        proxy = self.daemon("--allow", f"127.0.0.1:{target.port}", "--max-connections", "16")
        lingering = []
        self.addCleanup(lambda: [s.close() for s in lingering])
        for i in range(40):
            sock = dial(proxy.port, PROMPT)
            lingering.append(sock)
            if i % 2:
                sock.sendall(socks5_ip("127.0.0.1", denied.port))
                answer = recv_exact(sock, 12)
            else:
                sock.sendall(http_connect(f"127.0.0.1:{denied.port}".encode()))
                answer = recv_exact(sock, 12)
            self.assertTrue(answer.startswith((b"\x05\x00\x05\x02", b"HTTP/1.1 403", b"\x05\x00\x05\x01",
                                               b"HTTP/1.1 503")) or answer == b"", answer)
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", target.port)),
                        "a good client was refused while refused clients lingered in every slot")
        self.assertEqual(denied.accepted, 0)
        self.assert_alive(proxy)


class BackPressureTest(ProxyTestCase):
    def test_clients_that_never_read_keep_memory_bounded(self):
        flood = Flood(200 << 20)
        flooder = self.upstream(flood)
        target = self.upstream(echo_handler)
        proxy = self.daemon("--allow", f"127.0.0.1:{flooder.port}", "--allow", f"127.0.0.1:{target.port}")
        baseline = proxy.rss_kb()
        readers = []
        for _ in range(4):
            sock = dial(proxy.port, PROMPT)
            self.addCleanup(sock.close)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(socks5_ip("127.0.0.1", flooder.port))
            self.assertTrue(granted("socks5", recv_exact(sock, 12)))
            readers.append(sock)            # and never read from again
        peak = baseline
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            peak = max(peak, proxy.rss_kb())
            if flood.stalled.is_set() and flooder.done_count() >= 4:
                break
            if flood.sent >= 4 * (200 << 20):
                break
            time.sleep(0.05)
        # meanwhile another client is served
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", target.port)))
        peak = max(peak, proxy.rss_kb())
        self.assertTrue(flood.stalled.is_set(), f"the upstream was never held back ({flood.sent} bytes sent)")
        self.assertLess(flood.sent, 200 << 20, "the proxy read far more than it could deliver")
        self.assertLess(peak, 100 * 1024, f"proxy RSS reached {peak} kB (baseline {baseline} kB)")
        self.assert_alive(proxy)


class ConnectionFloodTest(ProxyTestCase):
    def test_flood_over_max_connections(self):
        target = self.upstream(hold_handler)
        echo = self.upstream(echo_handler)
        limit = 16
        proxy = self.daemon("--allow", f"127.0.0.1:{target.port}", "--allow", f"127.0.0.1:{echo.port}",
                            "--max-connections", str(limit))
        socks5 = socks5_ip("127.0.0.1", target.port)
        http = http_connect(f"127.0.0.1:{target.port}".encode())
        clients = []
        self.addCleanup(lambda: [s.close() for s, _ in clients])
        for i in range(300):
            proto, payload = ("socks5", socks5) if i % 2 else ("http", http)
            sock = socket.socket()
            sock.settimeout(PROMPT)
            try:
                sock.connect((LOOP, proxy.port))
                sock.sendall(payload)
            except OSError:
                pass
            clients.append((sock, proto))
        outcome = {"granted": 0, "refused": 0, "closed": 0}
        for sock, proto in clients:
            head = 12 if proto == "socks5" else 39
            try:
                answer = recv_exact(sock, head, timeout=10)
            except socket.timeout:
                self.fail("a flood client got neither an answer nor a close")
            except OSError:
                answer = b""
            if granted(proto, answer):
                outcome["granted"] += 1
            elif answer == b"":
                outcome["closed"] += 1
            else:
                rest, closed = read_until_closed(sock, 10)
                self.assertTrue(closed)
                self.assertTrue(refused(proto, answer + rest), answer + rest)
                if proto == "http":
                    self.assertIn(b"503", answer)
                outcome["refused"] += 1
        self.assertEqual(outcome["granted"], limit, outcome)
        self.assertGreater(outcome["refused"], 0, outcome)
        reasons = {r["reason"] for r in proxy.records() if r["decision"] == "deny"}
        self.assertEqual(reasons, {"too-many-connections"})
        # the granted tunnels stay open and idle: the daemon must not spin
        cpu = proxy.cpu_seconds()
        time.sleep(2.0)
        self.assertLess(proxy.cpu_seconds() - cpu, 0.5, "CPU burnt while idle after the flood")
        for sock, _ in clients:
            sock.close()
        deadline = time.monotonic() + 10
        while proxy.fd_count() > 40 and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu = proxy.cpu_seconds()
        time.sleep(1.5)
        self.assertLess(proxy.cpu_seconds() - cpu, 0.4, "CPU burnt while idle after the flood closed")
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", echo.port)))
        self.assert_alive(proxy)


class DescriptorExhaustionTest(ProxyTestCase):
    def test_out_of_descriptors(self):
        """The proxy runs with RLIMIT_NOFILE 128 (each relayed connection costs 6 descriptors:
        two sockets and two splice pipes), so it lowers its connection limit to what the
        descriptors carry. Tunnels and silent clients beyond that must not run it out of
        descriptors, make it crash or spin, or keep a good client out."""
        target = self.upstream(echo_handler)
        proxy = self.daemon("--allow", f"127.0.0.1:{target.port}", handshake_timeout=2.0, nofile=128)
        request = socks5_ip("127.0.0.1", target.port)
        tunnels = []
        self.addCleanup(lambda: [s.close() for s in tunnels])
        worked = 0
        for _ in range(16):
            sock = dial(proxy.port, PROMPT)
            tunnels.append(sock)
            try:
                sock.sendall(request + b"ping")
                answer = recv_exact(sock, 16, timeout=3)
            except OSError:
                continue
            worked += answer == b"\x05\x00\x05\x00" + answer[4:12] + b"ping"
        self.assertGreater(worked, 0)
        idle = []
        self.addCleanup(lambda: [s.close() for s in idle])
        for _ in range(80):
            idle.append(dial(proxy.port, PROMPT))
        time.sleep(0.5)
        self.assertLess(proxy.fd_count(), 128, "the proxy ran out of descriptors")
        cpu = proxy.cpu_seconds()
        time.sleep(2.0)
        self.assertLess(proxy.cpu_seconds() - cpu, 0.5, "CPU burnt while out of descriptors")
        self.assert_alive(proxy)
        for sock in tunnels + idle:
            sock.close()
        ok = False
        deadline = time.monotonic() + 15
        while not ok and time.monotonic() < deadline:
            ok = echo_through(proxy.port, request)
            if not ok:
                time.sleep(0.2)
        self.assertTrue(ok, "no service after descriptors were freed")
        self.assert_alive(proxy)


CONTROL = set(range(0x00, 0x20)) | set(range(0x7f, 0xa0))


class OutputInjectionTest(ProxyTestCase):
    """A requested name is hostile text: it must not reach the user's terminal (the summary line
    printed at exit, --verbose lines) or a log consumer with control characters in it."""

    HOSTILE = [b"\x1b]0;owned\x07\x1b[2J\x1b[31mEVIL", b"evil.example.net\r\nsocks_filter: 0 allowed, 0 denied",
               b"a\x9b31mb", b"\x1b[1;31mred\x1b[0m"]

    def test_hostile_names_are_escaped_in_output(self):
        proxy = self.daemon("--allow", "example.com", "--verbose")
        for name in self.HOSTILE:
            for payload, proto in ((socks5_name(name, 443), "socks5"), (socks4a_name(name, 443), "socks4a")):
                answer, _ = exchange(proxy.port, payload)
                self.assertTrue(refused(proto, answer), answer)
        hosts = [r["host"] for r in proxy.records()]
        self.assertEqual(len(hosts), 2 * len(self.HOSTILE))
        proxy.stop()
        err = proxy.stderr()
        with self.subTest(part="log"):
            for host in hosts:
                self.assertFalse(CONTROL & {ord(c) for c in host}, f"raw control characters in log host {host!r}")
        with self.subTest(part="stderr"):
            lines = err.split("\n")
            self.assertEqual(lines[-1], "")
            text = "".join(lines)
            self.assertFalse(CONTROL & {ord(c) for c in text}, f"raw control characters on stderr: {err!r}")
            self.assertEqual(len(lines) - 1, 2 * len(self.HOSTILE) + 1, f"forged lines on stderr: {err!r}")


class BoundedStateTest(ProxyTestCase):
    def test_distinct_denied_names_do_not_grow_state_without_bound(self):
        """Every denied request with a new name must not add to what the proxy keeps for the
        rest of its life: 6000 distinct denied names (a hostile agent can send millions) must
        not leave 6000 entries behind (here: the per-host tally behind the exit summary,
        ~340 bytes each, never freed)."""
        proxy = self.proxy("example.com")
        count = 6000

        def one(i):
            name = f"n{i:05d}.{'a' * 60}.{'b' * 60}.{'c' * 60}.evil.net".encode()
            try:
                exchange(proxy.port, socks5_name(name, 443))
            except OSError:
                pass
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(count)))
        self.assertIsNone(proxy.error)
        self.assertGreaterEqual(proxy.server.stats["denied"], count)
        kept = len(proxy.server.stats["denied_hosts"])
        self.assertLess(kept, count // 2, f"{kept} distinct denied hosts kept in memory")


# ---------------------------------------------------------------------------------------------
# TLS server name check: needs an upstream on port 443, so it runs in a network namespace the
# test creates (`unshare -rn`: root of a new user and network namespace, its own loopback).

def _bring_loopback_up():
    import fcntl
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, 0x8913, request))[1]     # SIOCGIFFLAGS
        fcntl.ioctl(sock, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))         # SIOCSIFFLAGS IFF_UP
    finally:
        sock.close()


class FakeDns:
    """A UDP DNS server on NAMESERVER:53 (inside the namespace). The first A query for a name is
    answered with a public address, every later one with 127.0.0.1: DNS rebinding. AAAA and
    other queries get an empty answer. Every query is recorded."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((NAMESERVER, 53))
        self.sock.settimeout(0.2)
        self.queries = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                labels, at = [], 12
                while data[at]:
                    labels.append(data[at + 1:at + 1 + data[at]].decode("ascii", "replace"))
                    at += 1 + data[at]
                qtype = struct.unpack("!H", data[at + 1:at + 3])[0]
                question = data[12:at + 5]
            except (IndexError, struct.error):
                continue
            name = ".".join(labels).lower()
            earlier = sum(1 for n, t in self.queries if n == name and t == 1)
            self.queries.append((name, qtype))
            answers = []
            if qtype == 1:
                address = "93.184.216.34" if earlier == 0 else "127.0.0.1"
                answers.append(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton(address))
            reply = (data[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, len(answers), 0, 0) + question
                     + b"".join(answers))
            try:
                self.sock.sendto(reply, peer)
            except OSError:
                pass

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def _rebinding_case(directory):
    """An allowed name whose first lookup is public and every later one loopback."""
    dns = FakeDns()
    upstream = Upstream(record_handler())
    proxy = ProxyProcess(directory, "--allow", "rebind.example.com")
    result = {}
    try:
        name = b"rebind.example.com"
        answers = []
        for proto, payload in attempts_for(name, upstream.port, ("socks5", "http-connect", "socks4a", "http")):
            answers.append((proto, exchange(proxy.port, payload, 10)[0]))
        result["granted"] = [granted(proto, answer) for proto, answer in answers]
        result["refused"] = [refused(proto, answer) for proto, answer in answers]
        result["a-queries"] = sum(1 for n, t in dns.queries if n == "rebind.example.com" and t == 1)
        result["requests"] = len(answers)
        result["decisions"] = [(r["decision"], r["reason"]) for r in proxy.records()]
        result["closes"] = [r["reason"] for r in proxy.records("close")]
        result["upstream-accepted"] = upstream.accepted
    finally:
        proxy.stop()
        upstream.stop()
        dns.stop()
    return result


def _sni_hellos():
    """What a client sends first through a tunnel to loop.example.com:443, by case name."""
    return {
        "real-match": client_hello("loop.example.com"),
        "real-mismatch": client_hello("evil.example.net"),
        "real-no-sni": client_hello(None),
        "built-match-upper": built_client_hello(b"LOOP.Example.COM"),
        "built-mismatch": built_client_hello(b"evil.example.net"),
        "built-mismatch-suffix": built_client_hello(b"loop.example.com.evil.net"),
        "built-mismatch-prefix": built_client_hello(b"xloop.example.com"),
        "built-mismatch-nul": built_client_hello(b"loop.example.com\x00.evil.net"),
        "built-mismatch-empty": built_client_hello(b""),
        "built-mismatch-escapes": built_client_hello(b"\x1b]0;owned\x07\x1b[2J\r\nsocks_filter: x\x9b"),
        "fragmented-match": built_client_hello(b"loop.example.com", pieces=5),
        "fragmented-mismatch": built_client_hello(b"evil.example.net", pieces=5),
        "not-tls": b"GET / HTTP/1.1\r\nHost: evil.example.net\r\n\r\n",
    }


# How each protocol opens the tunnel: (request, length of the proxy's answer)
SNI_OPENERS = {
    "http": (http_connect(b"loop.example.com:443"), 39),
    "socks5": (socks5_name(b"loop.example.com", 443), 12),
    "socks4a": (socks4a_name(b"loop.example.com", 443), 8),
}


def _sni_case(proxy, upstream, proto, hello, way):
    """Open a tunnel with `proto` and send `hello` whole, one byte at a time ("drip") or with
    the request ("pipelined"); return what the client and the upstream saw."""
    opener, head = SNI_OPENERS[proto]
    before = len(proxy.records("decision"))
    with dial(proxy.port, 10) as sock:
        sock.sendall(opener + hello if way == "pipelined" else opener)
        opened = recv_exact(sock, head, 10)
        if way == "drip":
            for i in range(len(hello)):
                sock.sendall(hello[i:i + 1])
        elif way == "whole":
            sock.sendall(hello)
        sock.shutdown(socket.SHUT_WR)
        answer, closed = read_until_closed(sock, 10)
    try:
        received = upstream.next_record(12)
    except queue.Empty:
        received = None
    return {"granted": granted(proto, opened), "closed": closed,
            "received": None if received is None else received.hex(),
            "sent": hello.hex(), "reasons": [r["reason"] for r in proxy.records("decision")[before:]]}


def _sni_cases(proxy, upstream):
    """Every hello through every protocol, keyed "case/proto[/way]"."""
    results = {}
    for case, hello in _sni_hellos().items():
        ways = ("whole", "drip", "pipelined") if case in ("real-match", "real-mismatch") else ("whole",)
        for proto in SNI_OPENERS:
            for way in ways:
                key = f"{case}/{proto}" + ("" if way == "whole" else f"/{way}")
                results[key] = _sni_case(proxy, upstream, proto, hello, way)
    return results


def _stalled_hello(proxy, upstream):
    """A partial ClientHello that never completes: closed at the handshake timeout."""
    with dial(proxy.port, 10) as sock:
        sock.sendall(http_connect(b"loop.example.com:443"))
        recv_exact(sock, 39, 10)
        sock.sendall(client_hello("loop.example.com")[:40])
        answer, closed = read_until_closed(sock, 10)
    received = upstream.next_record(12)
    return {"closed": closed, "received": received.hex(),
            "reasons": [r["reason"] for r in proxy.records("decision")[-1:]]}


def _sni_stall_at_limit(directory):
    """Whether a good client is served while 4 tunnels wait for their ClientHello at
    --max-connections 4."""
    limited = ProxyProcess(directory, "--allow", "loop.example.com:443", "--allow", f"{LOOP}:443",
                           "--max-connections", "4")
    stalled = []
    try:
        for _ in range(4):
            sock = dial(limited.port, 10)
            stalled.append(sock)
            sock.sendall(http_connect(b"loop.example.com:443"))
            recv_exact(sock, 39, 10)
        with dial(limited.port, 10) as sock:
            sock.sendall(http_connect(b"loop.example.com:443"))
            return granted("http", recv_exact(sock, 39, 10))
    finally:
        for sock in stalled:
            sock.close()
        limited.stop()


def _sni_checks(directory, upstream):
    """Every SNI case against a proxy and `upstream` on 127.0.0.1:443; what each observed."""
    proxy = ProxyProcess(directory, "--allow", "loop.example.com:443", "--allow", f"{LOOP}:443",
                         "--verbose", handshake_timeout=1.5)
    try:
        results = _sni_cases(proxy, upstream)
        results["stalled"] = _stalled_hello(proxy, upstream)
        results["close-records"] = len([r for r in proxy.records("close") if r["decision"] == "deny"])
        results["alive"] = proxy.alive()
    finally:
        proxy.stop()
    results["stderr"] = proxy.stderr()
    results["log-details"] = [r.get("detail", "") for r in proxy.records(None)]
    return results


def _sni_child():
    """Run inside the namespace: prints one JSON object with what every case observed."""
    _bring_loopback_up()
    with tempfile.TemporaryDirectory(prefix="bw-adv-sni-") as directory:
        for name in ("sni", "limited", "rebind"):
            os.mkdir(os.path.join(directory, name))
        upstream = Upstream(record_handler(idle=1.0), port=443)
        try:
            results = _sni_checks(os.path.join(directory, "sni"), upstream)
            results["sni-stall-good-client"] = _sni_stall_at_limit(os.path.join(directory, "limited"))
        finally:
            upstream.stop()
        results["rebind"] = _rebinding_case(os.path.join(directory, "rebind"))
    print(json.dumps(results))


class SniCheckTest(unittest.TestCase):
    MISMATCH = ("real-mismatch", "built-mismatch", "built-mismatch-suffix", "built-mismatch-prefix",
                "built-mismatch-nul", "built-mismatch-escapes",
                "built-mismatch-empty", "fragmented-mismatch")
    FLOW = ("real-match", "built-match-upper", "fragmented-match")
    REFUSED = {"real-no-sni": "no-sni", "not-tls": "not-tls"}   # closed with their own reason

    @classmethod
    def setUpClass(cls):
        cls.results = None
        cls.directory = tempfile.mkdtemp(prefix="bw-adv-sni-")
        try:
            prefix = namespace_prefix(cls.directory, net=True)
            if prefix is None:
                cls.reason = "needs `unshare -rnm` and `mount` (a private network namespace for port 443)"
                return
            code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                    "from tests import test_adversarial as t; t._sni_child()")
            run = subprocess.run(prefix + [sys.executable, "-c", code, REPO], capture_output=True,
                                 timeout=150, cwd=REPO)
            if run.returncode != 0:
                raise AssertionError(f"SNI child failed: {run.stderr.decode()[-4000:]}")
            cls.results = json.loads(run.stdout.decode().strip().splitlines()[-1])
        finally:
            shutil.rmtree(cls.directory, ignore_errors=True)

    def setUp(self):
        if self.results is None:
            skip_or_fail(self, self.reason)

    def test_mismatched_server_name_closes_the_tunnel(self):
        for key, seen in self.results.items():
            if key.split("/")[0] not in self.MISMATCH:
                continue
            with self.subTest(case=key):
                self.assertTrue(seen["granted"], "the tunnel should open before the hello")
                self.assertTrue(seen["closed"])
                self.assertEqual(seen["received"], "", "the upstream received bytes of the hello")
                self.assertEqual(seen["reasons"], ["sni-mismatch"],
                                 "a tunnel refused for its name must count as denied only")
        self.assertTrue(self.results["alive"])

    def test_matching_hello_flows(self):
        for key, seen in self.results.items():
            if key.split("/")[0] not in self.FLOW:
                continue
            with self.subTest(case=key):
                self.assertTrue(seen["granted"])
                self.assertEqual(seen["received"], seen["sent"], "the hello did not reach the upstream intact")
                self.assertNotIn("sni-mismatch", seen["reasons"])

    def test_missing_sni_or_no_tls_closes_the_tunnel(self):
        for key, seen in self.results.items():
            reason = self.REFUSED.get(key.split("/")[0])
            if reason is None:
                continue
            with self.subTest(case=key):
                self.assertTrue(seen["closed"])
                self.assertEqual(seen["received"], "", "the upstream received bytes")
                self.assertEqual(seen["reasons"], [reason])

    def test_incomplete_hello_is_closed_at_the_timeout(self):
        seen = self.results["stalled"]
        self.assertTrue(seen["closed"])
        self.assertEqual(seen["received"], "")
        self.assertEqual(seen["reasons"], ["tls-timeout"])

    def test_hostile_server_name_is_escaped(self):
        text = self.results["stderr"] + "".join(self.results["log-details"])
        self.assertIn("sni-mismatch", self.results["stderr"])
        self.assertFalse(CONTROL & {ord(c) for c in text.replace("\n", "")},
                         f"raw control characters from a ClientHello reached stderr/log: {text[-2000:]!r}")

    def test_stalled_tunnels_do_not_hold_every_slot(self):
        """Tunnels to an allowed :443 name whose client never sends its ClientHello are still in
        a handshake: at the connection limit they must not keep a well-behaved client out."""
        self.assertTrue(self.results["sni-stall-good-client"],
                        "4 tunnels stalled before their ClientHello filled --max-connections 4")

    def test_dns_rebinding_never_reaches_loopback(self):
        """One lookup per request; the connection goes to the address that was checked. The fake
        DNS answers public first, then 127.0.0.1: a proxy that looked up the name again to
        connect would reach the loopback upstream."""
        seen = self.results["rebind"]
        self.assertEqual(seen["upstream-accepted"], 0, seen)
        self.assertEqual(seen["a-queries"], seen["requests"], f"not exactly one lookup per request: {seen}")
        self.assertFalse(any(seen["granted"]), seen)
        self.assertTrue(all(seen["refused"]), seen)
        # first request: public answer, allowed, unreachable in the namespace; then private-address
        self.assertEqual(seen["decisions"][0], ["allow", "allowed-by-rule"], seen)
        self.assertEqual(seen["closes"][:1], ["unreachable"], seen)
        self.assertEqual(seen["decisions"][1:], [["deny", "private-address"]] * (seen["requests"] - 1), seen)

    def test_sni_mismatch_logged_as_close(self):
        mismatches = sum(1 for key in self.results if key.split("/")[0] in self.MISMATCH)
        self.assertGreaterEqual(self.results["close-records"], mismatches + 1)


# ---------------------------------------------------------------------------------------------

def mutate(rng, templates):
    """One of `templates` changed one to three times: bytes flipped, cut, inserted, a length or
    port field set, random bytes after a version byte, two templates spliced, a slice doubled."""
    data = bytearray(rng.choice(templates))
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        if op == 0 and data:                               # flip bytes
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1 and data:                             # truncate
            del data[rng.randrange(len(data)):]
        elif op == 2:                                      # insert random bytes
            at = rng.randint(0, len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 3 and len(data) > 4:                    # length/port fields
            at = rng.choice([1, 4, 7, 8] if len(data) > 8 else [1, 2, 3])
            data[at] = rng.choice([0, 1, 2, 3, 4, 5, 0x7f, 0xfe, 0xff, rng.randrange(256)])
        elif op == 4:                                      # random bytes after a version
            data = bytearray([rng.choice([4, 5, 0x43, 0x47, rng.randrange(256)])])
            data += bytes(rng.randrange(256) for _ in range(rng.randint(0, 600)))
        elif op == 5:                                      # splice two templates
            other = rng.choice(templates)
            data = data[:rng.randint(0, len(data))] + other[rng.randint(0, len(other)):]
        elif op == 6 and data:                             # duplicate a slice
            i = rng.randrange(len(data))
            data[i:i] = data[i:i + rng.randint(1, 40)]
    return bytes(data)


class FuzzTest(ProxyTestCase):
    SEED = 0x5EED5
    COUNT = 3000

    @staticmethod
    def templates(A, D):
        """Handshakes of every protocol to the allowed port A and the denied port D."""
        a, d = f"127.0.0.1:{A}".encode(), f"127.0.0.1:{D}".encode()
        return [
            socks5_ip("127.0.0.1", A), socks5_ip("127.0.0.1", D), socks5_name(b"loop.example.com", A),
            socks5_name(b"loop.example.com", D), socks5_name(b"127.0.0.1", D), socks5_ip("::1", D),
            socks4_ip("127.0.0.1", A), socks4_ip("127.0.0.1", D), socks4a_name(b"loop.example.com", A),
            socks4a_name(b"loop.example.com", D),
            http_connect(a), http_connect(d), http_connect(b"loop.example.com:" + str(A).encode()),
            http_get(a), http_get(d), http_get(b"loop.example.com:" + str(D).encode()),
            b"POST http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\nContent-Length: 3\r\n\r\nabc",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: " + d + b"\r\n\r\n",
        ]

    def test_mutated_handshakes(self):
        allowed = self.upstream(echo_handler)
        denied = self.upstream(record_handler())
        A, D = allowed.port, denied.port
        proxy = self.daemon("--allow", f"127.0.0.1:{A}", "--allow", f"loop.example.com:{A}",
                            "--allow-private", handshake_timeout=1.0, hosts=True)
        rng = random.Random(self.SEED)
        templates = self.templates(A, D)
        cases = [mutate(rng, templates) for _ in range(self.COUNT)]
        hung = []

        def run(payload):
            try:
                with dial(proxy.port, 8) as sock:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    _, closed = read_until_closed(sock, 8)
                    if not closed:
                        hung.append(payload)
            except OSError:
                pass

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(run, cases))
        self.assertEqual(hung, [], f"{len(hung)} connections never closed, e.g. {hung[:3]!r}")
        self.assert_alive(proxy)
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", A)))
        self.assertEqual(denied.accepted, 0, "a fuzzed handshake reached the denied upstream")
        records = proxy.records()
        self.assertGreater(len(records), self.COUNT // 2)
        allowed_records = [r for r in records if r["decision"] == "allow"]
        self.assertGreater(len(allowed_records), 0, "no mutated request was allowed at all")
        for record in allowed_records:
            self.assertEqual(record["port"], A, record)
            self.assertIn(record["host"], ("127.0.0.1", "loop.example.com"), record)
        self.assertGreater(len([r for r in records if r["reason"] == "bad-request"]), 100)


# ---------------------------------------------------------------------------------------------
# A second ClientHello after a TLS 1.3 HelloRetryRequest

STDBUF = ["stdbuf", "-o0", "-e0"] if shutil.which("stdbuf") else []    # s_server's lines as they come


class TlsServer:
    """`openssl s_server` on loopback, its groups limited to P-256 so that a ClientHello with
    only an X25519 key share gets a HelloRetryRequest. -servername makes it print the name its
    servername callback saw for every ClientHello; -rev echoes lines reversed."""

    def __init__(self, directory):
        self.out_path = os.path.join(directory, "s_server.out")
        key, cert = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=loop.example.com",
                        "-days", "2", "-keyout", key, "-out", cert],
                       check=True, capture_output=True, timeout=30)
        with open(self.out_path, "wb") as out:
            self.process = subprocess.Popen(
                [*STDBUF, "openssl", "s_server", "-accept", f"{LOOP}:0", "-cert", cert, "-key", key,
                 "-cert2", cert, "-key2", key, "-servername", "loop.example.com",
                 "-groups", "P-256", "-rev", "-trace"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "ACCEPT" not in self.output():
            time.sleep(0.05)
        accept = [line for line in self.output().splitlines() if line.startswith("ACCEPT")]
        if not accept:
            self.stop()
            raise AssertionError(f"s_server did not start: {self.output()[-2000:]}")
        self.port = int(accept[0].rpartition(":")[2])

    def output(self):
        with open(self.out_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def names_seen(self):
        """The server names its servername callback saw, one per ClientHello that had one."""
        return [line.split('"')[1] for line in self.output().splitlines()
                if line.startswith("Hostname in TLS extension:")]

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


class HelloRetryTest(ProxyTestCase):
    """A tunnel to a name opens with a ClientHello naming that host; a TLS 1.3 server that
    answers with a HelloRetryRequest reads a second ClientHello, whose name it takes too. The
    attack: hello 1 names the allowed host with a key share the server refuses, hello 2 (after
    the HelloRetryRequest) names another site. Checked on the host side by what the real TLS
    server's servername callback saw."""

    def setUp(self):
        super().setUp()
        require_tool(self, "openssl")
        self.tls = TlsServer(self.tmp)
        self.addCleanup(self.tls.stop)
        port = self.tls.port
        self.filter = self.daemon("--allow", f"loop.example.com:{port}", "--allow", f"{LOOP}:{port}",
                                  handshake_timeout=3, hosts=True)

    def tunnel(self):
        sock = dial(self.filter.port, 10)
        sock.sendall(http_connect(b"loop.example.com:%d" % self.tls.port))
        self.assertTrue(granted("http", recv_exact(sock, 39, 10)))
        return sock

    def retry(self, second, first=None):
        """Hello 1 for the allowed name, the server's answer, then `second`: (answer to hello
        1, what came after `second`, whether the tunnel was closed)."""
        with self.tunnel() as sock:
            sock.sendall(first or key_share_hello(b"loop.example.com"))
            answer = read_until(sock, HRR_RANDOM, 10)
            try:
                sock.sendall(second)
            except OSError:             # closed at its first bad byte
                pass
            after, closed = read_until_closed(sock, 10)
        return answer, after, closed

    def reasons(self):
        wait_for = time.monotonic() + 5
        while time.monotonic() < wait_for and not any(r["reason"] != "allowed-by-rule"
                                                      for r in self.filter.records()):
            time.sleep(0.05)
        return [r["reason"] for r in self.filter.records()]

    def test_second_hello_for_another_site_is_refused(self):
        cases = {
            "ccs-then-evil": CCS + key_share_hello(b"evil.example.net", share=P256),
            "evil": key_share_hello(b"evil.example.net", share=P256),
            "evil-fragmented": CCS + key_share_hello(b"evil.example.net", share=P256, pieces=4),
            "evil-dripped": (CCS + key_share_hello(b"evil.example.net", share=P256))[:150],
        }
        for case, second in cases.items():
            with self.subTest(case=case):
                before = len(self.tls.names_seen())
                records = len(self.filter.records())
                if case == "evil-dripped":      # the first 150 bytes 7 at a time, then the rest
                    full = CCS + key_share_hello(b"evil.example.net", share=P256)
                    with self.tunnel() as sock:
                        sock.sendall(key_share_hello(b"loop.example.com"))
                        answer = read_until(sock, HRR_RANDOM, 10)
                        for i in range(0, len(full), 7):
                            sock.sendall(full[i:i + 7])
                        after, closed = read_until_closed(sock, 10)
                else:
                    answer, after, closed = self.retry(second)
                self.assertIn(HRR_RANDOM, answer, "the server did not ask for another hello")
                # on the host: the TLS server's name callback saw only the allowed name
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and len(self.tls.names_seen()) == before:
                    time.sleep(0.05)
                self.assertEqual(self.tls.names_seen()[before:], ["loop.example.com"])
                self.assertNotIn("evil.example.net", self.tls.output())
                self.assertTrue(closed)
                self.assertEqual(after, b"")
                reasons = [r["reason"] for r in self.filter.records()[records:]]
                self.assertEqual(reasons, ["allowed-by-rule", "sni-mismatch"])
        self.assert_alive(self.filter)
        self.assertIn("sni-mismatch", [r["reason"] for r in self.filter.records("close")])

    def test_second_hello_without_a_name_or_malformed_is_refused(self):
        cases = {"no-sni": CCS + key_share_hello(None, share=P256),
                 "bad-client-hello": b"\x14\x03\x03\x00\x02\x01\x01" + key_share_hello(b"evil.example.net"),
                 "not-tls": b"GET / HTTP/1.1\r\nHost: evil.example.net\r\n\r\n"}
        for reason, second in cases.items():
            with self.subTest(reason=reason):
                records = len(self.filter.records())
                before = len(self.tls.names_seen())
                answer, after, closed = self.retry(second)
                self.assertIn(HRR_RANDOM, answer)
                self.assertTrue(closed)
                time.sleep(0.2)
                self.assertEqual(self.tls.names_seen()[before:], ["loop.example.com"])
                self.assertEqual([r["reason"] for r in self.filter.records()[records:]],
                                 ["allowed-by-rule", reason])

    def test_second_hello_hidden_in_the_first_record_is_refused(self):
        one = key_share_hello(b"loop.example.com")[5:]
        two = key_share_hello(b"evil.example.net", share=P256)[5:]
        with self.tunnel() as sock:
            sock.sendall(b"\x16\x03\x01" + struct.pack("!H", len(one + two)) + one + two)
            answer, closed = read_until_closed(sock, 10)
        self.assertTrue(closed)
        self.assertEqual(answer, b"")
        self.assertEqual(self.tls.names_seen(), [])
        self.assertEqual(self.reasons(), ["bad-client-hello"])

    def test_second_hello_for_the_same_name_reaches_the_server(self):
        answer, after, closed = self.retry(CCS + key_share_hello(b"loop.example.com", share=P256))
        self.assertIn(HRR_RANDOM, answer)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(self.tls.names_seen()) < 2:
            time.sleep(0.05)
        self.assertEqual(self.tls.names_seen(), ["loop.example.com", "loop.example.com"])
        self.assertNotIn("sni-mismatch", self.reasons())

    def test_real_clients_finish_the_handshake_with_and_without_a_retry(self):
        """Python's ssl client sends only an X25519 key share by default: against this server
        that is a HelloRetryRequest, then a full TLS 1.3 session through the tunnel; with a
        P-256 share there is no retry."""
        for curve in (None, "prime256v1"):
            with self.subTest(curve=curve):
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                if curve:
                    context.set_ecdh_curve(curve)
                retries = self.tls.output().count(HRR_RANDOM[4:].hex().upper())
                with self.tunnel() as sock:
                    with context.wrap_socket(sock, server_hostname="loop.example.com") as tls:
                        self.assertEqual(tls.version(), "TLSv1.3")
                        tls.sendall(b"through the tunnel\n")
                        self.assertEqual(read_until(tls, b"\n", 10), b"lennut eht hguorht\n")
                seen = self.tls.output().count(HRR_RANDOM[4:].hex().upper()) - retries
                self.assertEqual(seen, 0 if curve else 1, "the retry did (not) happen as planned")
        self.assertNotIn("sni-mismatch", self.reasons())
        self.assertNotIn("bad-server-hello", self.reasons())
        closes = self.filter.records("close")
        self.assertTrue(closes and all(r["bytes_up"] > 500 and r["bytes_down"] > 500 for r in closes),
                        closes)


class ServerAnswerTest(ProxyTestCase):
    """Until the server's ServerHello shows there is no HelloRetryRequest, what the client sends
    after its checked ClientHello is held; a server that answers anything else than TLS, or
    nothing, closes the tunnel ("bad-server-hello") and the held bytes never reach it."""

    def open_tunnel(self, server, data):
        proxy = self.daemon("--allow", f"loop.example.com:{server.port}", "--allow",
                            f"{LOOP}:{server.port}", handshake_timeout=1.5, hosts=True)
        with dial(proxy.port, 10) as sock:
            sock.sendall(http_connect(b"loop.example.com:%d" % server.port))
            self.assertTrue(granted("http", recv_exact(sock, 39, 10)))
            sock.sendall(data)
            answer, closed = read_until_closed(sock, 10)
        return proxy, answer, closed

    def test_an_answer_that_is_not_tls_closes_the_tunnel(self):
        server = self.upstream(record_handler(reply=b"HTTP/1.1 200 OK\r\n\r\n", idle=0.3))
        hello = client_hello("loop.example.com")
        proxy, answer, closed = self.open_tunnel(server, hello + b"held until the ServerHello")
        self.assertTrue(closed)
        self.assertEqual(server.next_record(12), hello, "bytes after the hello reached the server")
        self.assertEqual([r["reason"] for r in proxy.records()], ["allowed-by-rule", "bad-server-hello"])
        self.assertEqual(proxy.records("close")[0]["decision"], "deny")
        self.assert_alive(proxy)

    def test_a_silent_server_closes_the_tunnel_in_time(self):
        server = self.upstream(hold_handler)
        started = time.monotonic()
        proxy, answer, closed = self.open_tunnel(server, client_hello("loop.example.com"))
        self.assertTrue(closed)
        self.assertLess(time.monotonic() - started, 9)
        self.assertEqual([r["reason"] for r in proxy.records()], ["allowed-by-rule", "bad-server-hello"])


if __name__ == "__main__":
    unittest.main()
