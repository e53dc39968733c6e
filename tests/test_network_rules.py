"""An allowed rule carries exactly what it names, pure parts: the :PORT/raw syntax (default
profile rules name their ports), what may open a tunnel to a name (alert, CCS, heartbeat,
data, no SNI), and proxy credentials (HTTP Basic, RFC 1929)."""

import base64
import unittest

import bw_lib
import socks_filter
from tests.sandbox_harness import ALERT, NAME, SSH_BANNER
from tests.proxy_harness import built_client_hello, client_hello


class RawRuleTest(unittest.TestCase):
    def test_raw_rules_name_a_port(self):
        rule = socks_filter.parse_rule("github.com:22/raw")
        self.assertEqual((rule.kind, rule.value, rule.port, rule.raw, rule.text),
                         ("name", "github.com", 22, True, "github.com:22/raw"))
        self.assertTrue(socks_filter.parse_rule("*.example.com:5432/raw").raw)
        self.assertFalse(socks_filter.parse_rule("github.com:22").raw)
        for bad in ("github.com/raw", "*.example.com/raw", "github.com:22/raw/raw", "/raw",
                    "github.com:22/RAW", "github.com:22/tls"):
            with self.subTest(rule=bad), self.assertRaises(socks_filter.RuleError):
                socks_filter.parse_rule(bad)

    def test_only_a_raw_rule_lets_a_name_carry_other_protocols(self):
        policy = socks_filter.Policy([socks_filter.parse_rule(r) for r in
                                      ("github.com:443", "github.com:22/raw", "*.db.example:5432/raw")])
        self.assertTrue(socks_filter.allows_raw(policy, "github.com", 22))
        self.assertFalse(socks_filter.allows_raw(policy, "github.com", 443))
        self.assertTrue(socks_filter.allows_raw(policy, "a.db.example", 5432))
        self.assertFalse(socks_filter.allows_raw(policy, "a.db.example", 5433))

    def test_default_profile_rules_name_their_ports(self):
        for profile in bw_lib.PROFILES.values():
            for text in profile.allow:
                with self.subTest(profile=profile.name, rule=text):
                    rule = socks_filter.parse_rule(text)
                    self.assertEqual((rule.port, rule.raw), (443, False))
            for text in profile.expected_blocked:
                self.assertEqual(socks_filter.parse_rule(text).port, 443)


class TunnelStartTest(unittest.TestCase):
    def test_a_hello_naming_the_server_even_split_byte_by_byte(self):
        hello = built_client_hello(NAME.encode(), pieces=4)
        for end in range(1, len(hello)):
            self.assertIsNone(socks_filter.tunnel_start(hello[:end]), end)
        self.assertEqual(socks_filter.tunnel_start(hello), ("sni", NAME))
        self.assertEqual(socks_filter.tunnel_start(client_hello(NAME) + b"more"), ("sni", NAME))

    def test_anything_else_first_has_its_own_reason(self):
        hello = client_hello("attacker.example")
        cases = {
            "tls-alert-first": ALERT + hello,
            "tls-change-cipher-spec-first": b"\x14\x03\x03\x00\x01\x01" + hello,
            "tls-heartbeat-first": b"\x18\x03\x03\x00\x03\x01\x00\x00" + hello,
            "tls-data-first": b"\x17\x03\x03\x00\x02hi" + hello,
            "no-sni": client_hello(None),
            "not-tls": SSH_BANNER,
            "bad-client-hello": b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
        }
        for reason, data in cases.items():
            with self.subTest(reason=reason):
                self.assertEqual(socks_filter.tunnel_start(data)[0], reason)
                self.assertIn(reason, socks_filter.REASONS)
                self.assertIn(reason, socks_filter.TUNNEL_REFUSALS)
        self.assertEqual(socks_filter.tunnel_start(ALERT[:1])[0], "tls-alert-first")
        # a handshake record, then an alert before the hello is complete
        split = built_client_hello(NAME.encode(), pieces=3)
        first = 5 + int.from_bytes(split[3:5], "big")
        self.assertEqual(socks_filter.tunnel_start(split[:first] + ALERT)[0], "bad-client-hello")


class CredentialTest(unittest.TestCase):
    def test_http_basic(self):
        def head(*headers):
            return ("CONNECT a.example:443 HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers)
                    + "\r\n").encode()
        good = "Proxy-Authorization: Basic " + base64.b64encode(b"bw:s3cret").decode()
        self.assertEqual(socks_filter.http_proxy_password(head(good)), b"s3cret")
        self.assertIsNone(socks_filter.http_proxy_password(head()))
        self.assertIsNone(socks_filter.http_proxy_password(head(good, good)))
        self.assertIsNone(socks_filter.http_proxy_password(head("Proxy-Authorization: Bearer x")))
        self.assertIsNone(socks_filter.http_proxy_password(head("Proxy-Authorization: Basic !!")))

    def test_socks5_username_password(self):
        data = b"\x01\x02bw\x06s3cret" + b"\x05\x01"
        self.assertEqual(socks_filter.parse_socks5_userpass(data), (b"s3cret", 11))
        for end in range(len(data) - 2):
            self.assertIsNone(socks_filter.parse_socks5_userpass(data[:end]))
        with self.assertRaises(socks_filter.ProtocolError):
            socks_filter.parse_socks5_userpass(b"\x05\x02bw")



if __name__ == "__main__":
    unittest.main()
