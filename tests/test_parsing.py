"""socks_filter's parsers and buffers as pure functions, without sockets: the HTTP request
head, the TLS hellos behind the server-name check, and the relay's pipe pool."""

import os
import struct
import unittest

import socks_filter
from tests.proxy_harness import CCS, HRR_RANDOM, key_share_hello, server_hello


class AbsoluteFormParsingTest(unittest.TestCase):
    """The URL of an absolute-form request is split at the first '/', '?' or '#'."""

    def test_query_without_path_is_kept_whole(self):
        for target, expected in ((b"http://example.com?a/b", b"GET /?a/b HTTP/1.1"),
                                 (b"http://example.com/p?q=1/2", b"GET /p?q=1/2 HTTP/1.1"),
                                 (b"http://example.com", b"GET / HTTP/1.1"),
                                 (b"http://example.com:8080/x", b"GET /x HTTP/1.1")):
            with self.subTest(target=target):
                request, _ = socks_filter.parse_http_request(bytearray(b"GET " + target + b" HTTP/1.1\r\n\r\n"))
                self.assertEqual(request.head.split(b"\r\n")[0], expected)
                self.assertEqual(request.host, "example.com")


class HelloRetryParsingTest(unittest.TestCase):
    """The pure functions behind the HelloRetryRequest check."""

    def test_server_hello_kind(self):
        warning = b"\x15\x03\x03\x00\x02\x01\x70"           # unrecognized_name, warning level
        cases = [
            (server_hello(HRR_RANDOM), "hello-retry"),
            (server_hello(HRR_RANDOM) + CCS, "hello-retry"),
            (server_hello(HRR_RANDOM, pieces=4), "hello-retry"),
            (warning + server_hello(HRR_RANDOM), "hello-retry"),
            (server_hello(os.urandom(32)), "server-hello"),
            (server_hello(HRR_RANDOM[:31] + b"\0"), "server-hello"),
            (server_hello(HRR_RANDOM)[:30], None),
            (server_hello(HRR_RANDOM, pieces=4)[:40], None),
            (b"", None),
            (b"\x16\x03", None),
        ]
        for data, expected in cases:
            with self.subTest(data=data[:48].hex()):
                self.assertEqual(socks_filter.server_hello_kind(data), expected)

    def test_malformed_answers_raise(self):
        for data in (b"HTTP/1.1 200 OK\r\n\r\n", b"SSH-2.0-x\r\n",
                     b"\x17\x03\x03\x00\x02hi" + server_hello(HRR_RANDOM),      # data first
                     CCS + server_hello(HRR_RANDOM),                            # CCS first
                     b"\x16\x03\x03\x00\x04\x0b\x00\x00\x00",                   # not a ServerHello
                     b"\x16\x03\x03\xff\xff",                                   # oversized record
                     b"\x15\x03\x03\x00\x02\x01\x70" * 10000):                  # endless alerts
            with self.subTest(data=data[:24].hex()):
                with self.assertRaises(socks_filter.ProtocolError):
                    socks_filter.server_hello_kind(data)

    def test_retry_hello_start(self):
        evil, good = key_share_hello(b"evil.example.net"), key_share_hello(b"loop.example.com")
        cases = [
            (good, ("sni", "loop.example.com")),
            (CCS + evil, ("sni", "evil.example.net")),
            (CCS + key_share_hello(b"evil.example.net", pieces=6), ("sni", "evil.example.net")),
            (CCS + key_share_hello(None), ("no-sni",)),
            (CCS + CCS + good, ("tls-change-cipher-spec-first",)),
            (b"\x14\x03\x03\x00\x02\x01\x01" + good, ("bad-client-hello",)),
            (CCS + b"\x15\x03\x03\x00\x02\x01\x00", ("tls-alert-first",)),
            (CCS[:4], None),
            (CCS + evil[:20], None),
        ]
        for data, expected in cases:
            with self.subTest(data=data[:24].hex()):
                found = socks_filter.retry_hello_start(data)
                self.assertEqual(found if found is None else found[:len(expected)], expected)

    def test_the_reason_is_known(self):
        self.assertIn("bad-server-hello", socks_filter.TUNNEL_REFUSALS)
        self.assertIn("bad-server-hello", socks_filter.REASONS)

    def test_client_hello_end(self):
        hello = key_share_hello(b"loop.example.com", pieces=3)
        self.assertEqual(socks_filter.client_hello_end(hello + CCS), len(hello))
        # a second hello hidden in the first one's last record is refused
        one = key_share_hello(b"loop.example.com")[5:]
        two = key_share_hello(b"evil.example.net")[5:]
        both = b"\x16\x03\x01" + struct.pack("!H", len(one + two)) + one + two
        with self.assertRaises(socks_filter.ProtocolError):
            socks_filter.client_hello_end(both)
        self.assertEqual(socks_filter.tunnel_start(both), ("sni", "loop.example.com"))


class PipePoolTest(unittest.TestCase):
    """Relay pipes are reused only when empty: one connection's bytes never reach another."""

    def test_a_pipe_holding_bytes_is_closed_not_reused(self):
        pool = socks_filter.PipePool(keep=4)
        self.addCleanup(pool.close)
        full = pool.take()
        os.write(full[1], b"left over from an earlier connection")
        pool.give_back(full)
        self.assertEqual(pool.spare, [])
        with self.assertRaises(OSError):
            os.fstat(full[0])

    def test_an_empty_pipe_is_reused_and_the_pool_is_bounded(self):
        pool = socks_filter.PipePool(keep=1)
        self.addCleanup(pool.close)
        first, second = pool.take(), pool.take()
        pool.give_back(first)
        pool.give_back(second)
        self.assertEqual(pool.spare, [first])
        self.assertEqual(pool.take(), first)


if __name__ == "__main__":
    unittest.main()
