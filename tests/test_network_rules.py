"""An allowed rule carries exactly what it names, pure parts: the :PORT/raw syntax (default
profile rules name their ports), what may open a tunnel to a name (alert, CCS, heartbeat,
data, no SNI), and proxy credentials (HTTP Basic, RFC 1929)."""

import base64
import os
import subprocess
import sys
import tempfile
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


# A plan's rule checks in a fresh interpreter: whether socks_filter was imported, and the
# first line of a refusal.
PLAN_ALLOW = """
import sys
sys.path.insert(0, sys.argv[1])
import bw_lib
profile = bw_lib.PROFILES["claude"]
opts = bw_lib.parse_args(profile, sys.argv[3:])
try:
    bw_lib.plan_allow(profile, opts, {"HOME": sys.argv[2]}, sys.argv[2], [])
except bw_lib.Failure as failure:
    print("refused:", failure)
print("socks_filter imported:", "socks_filter" in sys.modules)
"""


class PlanRuleCheckTest(unittest.TestCase):
    def plan_allow(self, *argv):
        home = tempfile.mkdtemp(prefix="bw-rules-")
        self.addCleanup(os.rmdir, home)
        result = subprocess.run([sys.executable, "-I", "-S", "-c", PLAN_ALLOW,
                                 os.path.dirname(os.path.abspath(bw_lib.__file__)), home, *argv],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_only_the_rules_given_are_checked_at_the_start(self):
        """The profile's and the presets' rules are constants (checked by the tests above and
        by PresetTest, and again by the proxy at its start): a start without rules of its own
        does not import socks_filter (~10 ms); a rule given is checked, a bad one refused."""
        self.assertIn("socks_filter imported: False",
                      self.plan_allow("--filter-network", "--allow-preset", "npm"))
        given = self.plan_allow("--filter-network", "--allow-domain", "x.example:443")
        self.assertIn("socks_filter imported: True", given)
        self.assertNotIn("refused", given)
        for bad in (["--allow-domain", "*"], ["--allow-domain", "*.com"]):
            with self.subTest(bad=bad):
                self.assertIn("refused: bad allow rule: --allow-domain",
                              self.plan_allow("--filter-network", *bad))

    def test_a_log_without_records_is_summed_up_as_summarize_would(self):
        for profile in bw_lib.PROFILES.values():
            for width in (None, 20, 200):
                with self.subTest(profile=profile.name, width=width):
                    self.assertEqual(bw_lib.format_story(profile.tool, 0, [], width),
                                     bw_lib.summarize(profile.tool, ["\n"], width,
                                                      profile.expected_blocked))


if __name__ == "__main__":
    unittest.main()
