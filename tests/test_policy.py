"""The allow list's decisions as pure functions: every rule form and every known bypass.

No sockets here: these tests call socks_filter's policy functions directly, so each row of a
table is one decision the proxy would make before (or after) a DNS lookup.
"""

import ipaddress
import os
import tempfile
import unittest

import socks_filter
from socks_filter import BadName, Policy, RuleError, parse_rule


def policy(*allow, deny=(), **options):
    return Policy([parse_rule(r) for r in allow], [parse_rule(r) for r in deny], **options)


class IpSpellingTest(unittest.TestCase):
    """Every spelling getaddrinfo()/inet_aton() turns into an address is seen as that address."""

    TABLE = [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7F.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("0.0.0.0", "0.0.0.0"),
        ("169.254.169.254", "169.254.169.254"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("[::ffff:7f00:1]", "127.0.0.1"),
        ("64:ff9b::7f00:1", "64:ff9b::7f00:1"),
    ]
    NOT_ADDRESSES = ["example.com", "1.2.3.example", "256.1.1.1", "1.2.3.4.5", "0x", "08.1.1.1",
                     "4294967296", "1.2.65536", "[example.com]", "::zz", "1.2.3.-1", ""]

    def test_spellings_reach_their_address(self):
        for text, expected in self.TABLE:
            with self.subTest(text=text):
                self.assertEqual(socks_filter.parse_ip_spelling(text), ipaddress.ip_address(expected))

    def test_other_text_is_not_an_address(self):
        for text in self.NOT_ADDRESSES:
            with self.subTest(text=text):
                self.assertIsNone(socks_filter.parse_ip_spelling(text))


class CanonicalNameTest(unittest.TestCase):
    def test_case_and_one_trailing_dot(self):
        self.assertEqual(socks_filter.canonical_name("Example.COM."), "example.com")
        self.assertEqual(socks_filter.canonical_name("a-b.example.com"), "a-b.example.com")

    def test_bad_names(self):
        bad = ["", ".", "example.com..", "a..b.com", ".example.com", "localhost\x00.example.com",
               "example.com\n", "exa mple.com", "ex_ample.com", "exämple.com", "example.com/x",
               "user@example.com", "example.com:443", "*.example.com", "a" * 64 + ".com",
               ("a" * 62 + ".") * 4 + "com", "example.123", "256.1.1.1", "08.1.1.1"]
        for text in bad:
            with self.subTest(text=text):
                with self.assertRaises(BadName):
                    socks_filter.canonical_name(text)

    def test_longest_name_is_accepted(self):
        name = ".".join(["a" * 63] * 3 + ["b" * 61])
        self.assertEqual(len(name), 253)
        self.assertEqual(socks_filter.canonical_name(name), name)


class PublicAddressTest(unittest.TestCase):
    NOT_PUBLIC = ["127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
                  "169.254.169.254", "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255",
                  "240.0.0.1", "192.0.2.1", "198.18.0.1", "::", "::1", "fe80::1", "fc00::1",
                  "fd12:3456::1", "fec0::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
                  "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b:1::1", "2002:7f00:1::",
                  "2002:a9fe:a9fe::1", "2002:5db8:d822::1", "2001:db8::1", "::127.0.0.1",
                  "2001::1"]
    PUBLIC = ["93.184.216.34", "1.1.1.1", "8.8.8.8", "2606:4700::1111", "64:ff9b::5db8:d822",
              "::ffff:93.184.216.34"]

    def test_private_reserved_and_wrapped(self):
        for text in self.NOT_PUBLIC:
            with self.subTest(address=text):
                self.assertFalse(socks_filter.is_public_address(ipaddress.ip_address(text)))

    def test_public(self):
        for text in self.PUBLIC:
            with self.subTest(address=text):
                self.assertTrue(socks_filter.is_public_address(ipaddress.ip_address(text)))


class RuleParsingTest(unittest.TestCase):
    GOOD = [
        ("example.com", "name", "example.com", None),
        ("Example.COM.", "name", "example.com", None),
        ("example.com:443", "name", "example.com", 443),
        ("*.example.com", "wildcard", "example.com", None),
        ("*.example.com:8443", "wildcard", "example.com", 8443),
        ("xn--strae-oqa.de", "name", "xn--strae-oqa.de", None),
        ("1.2.3.4", "ip", ipaddress.ip_network("1.2.3.4/32"), None),
        ("1.2.3.4:80", "ip", ipaddress.ip_network("1.2.3.4/32"), 80),
        ("10.0.0.0/8", "ip", ipaddress.ip_network("10.0.0.0/8"), None),
        ("10.0.0.0/8:22", "ip", ipaddress.ip_network("10.0.0.0/8"), 22),
        ("[::1]", "ip", ipaddress.ip_network("::1/128"), None),
        ("[::1]:8080", "ip", ipaddress.ip_network("::1/128"), 8080),
        ("[2001:db8::]/32", "ip", ipaddress.ip_network("2001:db8::/32"), None),
        ("[2001:db8::]/32:443", "ip", ipaddress.ip_network("2001:db8::/32"), 443),
        ("[::ffff:127.0.0.1]", "ip", ipaddress.ip_network("127.0.0.1/32"), None),
    ]
    BAD = ["", "*", "*.com", "com", "*.co.uk", "*.github.io", "localhost", "*.", "*example.com",
           "ex*.example.com", "a.*.example.com", "example.com:0", "example.com:65536",
           "example.com:http", "example.com:", "::1", "[::1", "[::1]x", "0.0.0.0/0", "1.0.0.0/7",
           "[::]/0", "10.0.0.1/8", "300.1.1.1", "1.2.3", "exämple.com", "ex ample.com",
           "example..com", "example.com\n.evil"]

    def test_rule_forms(self):
        for text, kind, value, port in self.GOOD:
            with self.subTest(rule=text):
                rule = parse_rule(text)
                self.assertEqual((rule.kind, rule.value, rule.port), (kind, value, port))

    def test_rejected_rules_say_why(self):
        for text in self.BAD:
            with self.subTest(rule=text):
                with self.assertRaises(RuleError) as caught:
                    parse_rule(text)
                self.assertTrue(str(caught.exception))

    def test_rule_file_with_comments_and_blanks(self):
        with tempfile.NamedTemporaryFile("w", suffix=".rules", delete=False) as handle:
            handle.write("# registries\n\nregistry.npmjs.org  # npm\n*.pythonhosted.org:443\n\n")
        self.addCleanup(os.unlink, handle.name)
        rules = socks_filter.read_rule_file(handle.name)
        self.assertEqual([r.text for r in rules], ["registry.npmjs.org", "*.pythonhosted.org:443"])

    def test_rule_file_error_names_file_and_line(self):
        with tempfile.NamedTemporaryFile("w", suffix=".rules", delete=False) as handle:
            handle.write("example.com\n*.com\n")
        self.addCleanup(os.unlink, handle.name)
        with self.assertRaisesRegex(RuleError, r"\.rules:2: "):
            socks_filter.read_rule_file(handle.name)


class RequestDecisionTest(unittest.TestCase):
    """check_request: the decision made before any lookup, one row per case."""

    POLICY = policy("example.com", "*.allowed.org", "api.example.net:443", "93.184.216.34",
                    "127.0.0.1:8080", "[2606:4700::]/32:443",
                    deny=["blocked.allowed.org", "93.184.216.34:25"])

    TABLE = [
        # host, port, allowed, reason
        ("example.com", 443, True, "allowed-by-rule"),
        ("Example.COM.", 80, True, "allowed-by-rule"),
        ("EXAMPLE.com", 443, True, "allowed-by-rule"),
        ("www.example.com", 443, False, "not-in-allowlist"),
        ("evilexample.com", 443, False, "not-in-allowlist"),
        ("example.com.evil.net", 443, False, "not-in-allowlist"),
        ("x.example.com.evil.net", 443, False, "not-in-allowlist"),
        ("example.com\n", 443, False, "bad-name"),
        ("example.com.\n", 443, False, "bad-name"),
        ("localhost\x00.example.com", 443, False, "bad-name"),
        ("example.com\x00", 443, False, "bad-name"),
        ("example.com..", 443, False, "bad-name"),
        ("exa%6dple.com", 443, False, "bad-name"),
        ("xn--strae-oqa.allowed.org", 443, True, "allowed-by-rule"),
        ("straße.allowed.org", 443, False, "bad-name"),
        ("a.allowed.org", 443, True, "allowed-by-rule"),
        ("a.b.c.allowed.org", 22, True, "allowed-by-rule"),
        ("allowed.org", 443, False, "not-in-allowlist"),
        ("blocked.allowed.org", 443, False, "denied-by-rule"),
        ("BLOCKED.allowed.org.", 443, False, "denied-by-rule"),
        ("api.example.net", 443, True, "allowed-by-rule"),
        ("api.example.net", 80, False, "not-in-allowlist"),
        ("x" * 250 + ".com", 443, False, "bad-name"),
        ("example.com", 0, False, "bad-port"),
        ("example.com", 65536, False, "bad-port"),
        ("93.184.216.34", 443, True, "allowed-by-rule"),
        ("93.184.216.34", 25, False, "denied-by-rule"),
        ("1572395042", 443, True, "allowed-by-rule"),
        ("93.184.216.35", 443, False, "ip-literal-not-allowed"),
        ("127.0.0.1", 8080, True, "allowed-by-rule"),
        ("127.1", 8080, True, "allowed-by-rule"),
        ("127.0.0.1", 8081, False, "private-address"),
        ("127.1", 80, False, "private-address"),
        ("0x7f.1", 80, False, "private-address"),
        ("2130706433", 80, False, "private-address"),
        ("0177.0.0.1", 80, False, "private-address"),
        ("0.0.0.0", 8080, False, "private-address"),
        ("0", 8080, False, "private-address"),
        ("169.254.169.254", 80, False, "private-address"),
        ("[::ffff:127.0.0.1]", 8080, True, "allowed-by-rule"),
        ("::ffff:127.0.0.1", 80, False, "private-address"),
        ("64:ff9b::7f00:1", 8080, False, "private-address"),
        ("2002:7f00:1::", 8080, False, "private-address"),
        ("::1", 8080, False, "private-address"),
        ("[2606:4700::1111]", 443, True, "allowed-by-rule"),
        ("2606:4700::1111", 80, False, "ip-literal-not-allowed"),
        ("example.123", 443, False, "bad-name"),
        ("999.1.1.1", 443, False, "bad-name"),
    ]

    def test_table(self):
        for host, port, allowed, reason in self.TABLE:
            with self.subTest(host=host, port=port):
                verdict = self.POLICY.check_request(host, port)
                self.assertEqual((verdict.allowed, verdict.reason), (allowed, reason))
                self.assertTrue(verdict.enforced)

    def test_nothing_allowed_by_an_empty_policy(self):
        empty = Policy()
        for host in ("example.com", "1.1.1.1", "127.0.0.1", "localhost"):
            with self.subTest(host=host):
                self.assertFalse(empty.check_request(host, 443).allowed)


class ResolvedAddressTest(unittest.TestCase):
    """check_address: every address an allowed name resolves to (DNS rebinding)."""

    def test_allowed_name_resolving_to_private_addresses_is_refused(self):
        rules = policy("example.com")
        for text in ("127.0.0.1", "10.0.0.5", "169.254.169.254", "::1", "::ffff:192.168.0.1",
                     "64:ff9b::a9fe:a9fe", "fd00::1", "0.0.0.0"):
            with self.subTest(address=text):
                verdict = rules.check_address(ipaddress.ip_address(text), 443)
                self.assertEqual((verdict.allowed, verdict.reason), (False, "private-address"))

    def test_public_resolution_is_allowed(self):
        verdict = policy("example.com").check_address(ipaddress.ip_address("93.184.216.34"), 443)
        self.assertTrue(verdict.allowed)

    def test_allow_private_lets_names_reach_private_addresses(self):
        rules = policy("intranet.example.com", allow_private=True)
        self.assertTrue(rules.check_address(ipaddress.ip_address("10.0.0.5"), 443).allowed)

    def test_ip_rule_covers_private_address(self):
        rules = policy("example.com", "10.0.0.0/8:443")
        self.assertTrue(rules.check_address(ipaddress.ip_address("10.1.2.3"), 443).allowed)
        self.assertFalse(rules.check_address(ipaddress.ip_address("10.1.2.3"), 80).allowed)

    def test_deny_ip_rule_wins_over_resolution(self):
        rules = policy("example.com", deny=["93.184.216.0/24"])
        verdict = rules.check_address(ipaddress.ip_address("93.184.216.34"), 443)
        self.assertEqual((verdict.allowed, verdict.reason), (False, "denied-by-rule"))

    def test_literal_needs_an_ip_rule_even_with_allow_private(self):
        rules = policy("example.com", allow_private=True)
        self.assertEqual(rules.check_request("10.0.0.5", 80).reason, "ip-literal-not-allowed")


class AuditModeTest(unittest.TestCase):
    def test_unlisted_destinations_pass_but_are_recorded_as_denials(self):
        rules = policy("example.com", deny=["ads.example.org"], mode="audit")
        unlisted = rules.check_request("other.example.org", 443)
        self.assertTrue(unlisted.allowed)
        self.assertFalse(unlisted.enforced)
        self.assertEqual((unlisted.decision, unlisted.reason), ("deny", "not-in-allowlist"))
        literal = rules.check_request("93.184.216.34", 443)
        self.assertEqual((literal.allowed, literal.enforced), (True, False))

    def test_checks_still_apply_in_audit_mode(self):
        rules = policy("example.com", deny=["ads.example.org"], mode="audit")
        for host, reason in (("ads.example.org", "denied-by-rule"), ("127.0.0.1", "private-address"),
                             ("bad_name.example.org", "bad-name"), ("169.254.169.254", "private-address")):
            with self.subTest(host=host):
                verdict = rules.check_request(host, 443)
                self.assertEqual((verdict.allowed, verdict.reason), (False, reason))
        resolved = rules.check_address(ipaddress.ip_address("10.0.0.1"), 443)
        self.assertFalse(resolved.allowed)


if __name__ == "__main__":
    unittest.main()
