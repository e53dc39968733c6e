"""The allow list's decisions as pure functions: every rule form and every known bypass.

No sockets here: these tests call socks_filter's policy functions directly, so each row of a
table is one decision the proxy would make before (or after) a DNS lookup.
"""

import ipaddress
import json
import os
import tempfile
import unittest

import socks_filter
from socks_filter import BadName, Policy, RuleError, parse_rule


def policy(*allow, deny=(), **options):
    return Policy([parse_rule(r) for r in allow], [parse_rule(r, deny=True) for r in deny], **options)


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
               "example.com\n", "exa mple.com", "ex%ample.com", "exämple.com", "example.com/x",
               "user@example.com", "example.com:443", "*.example.com", "a" * 64 + ".com",
               ("a" * 62 + ".") * 4 + "com", "example.123", "256.1.1.1", "08.1.1.1",
               "-x.example.com", "x-.example.com", "a.-b.example.com"]
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
        ("169.254.169.254", 80, False, "platform-endpoint"),
        ("[::ffff:127.0.0.1]", 8080, True, "allowed-by-rule"),
        ("::ffff:127.0.0.1", 80, False, "private-address"),
        # an allow rule for an IPv4 address does not cover a global 6to4 or NAT64 address
        # that merely embeds it (RFC 6052: loopback is never translated)
        ("64:ff9b::7f00:1", 8080, False, "private-address"),
        ("2002:7f00:1::", 8080, False, "private-address"),
        ("64:ff9b::7f00:1", 80, False, "private-address"),
        ("2002:7f00:1::", 80, False, "private-address"),
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
        for text in ("127.0.0.1", "10.0.0.5", "169.254.1.1", "::1", "::ffff:192.168.0.1",
                     "64:ff9b::a9fe:101", "fd00::1", "0.0.0.0"):
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
                             ("bad name.example.org", "bad-name"), ("169.254.169.254", "platform-endpoint")):
            with self.subTest(host=host):
                verdict = rules.check_request(host, 443)
                self.assertEqual((verdict.allowed, verdict.reason), (False, reason))
        resolved = rules.check_address(ipaddress.ip_address("10.0.0.1"), 443)
        self.assertFalse(resolved.allowed)


# ---------------------------------------------------------------------------------------------
# Addresses inside addresses, platform endpoints, --allow-private, broad rules, rule syntax and
# this machine's own addresses

def verdict_of(rules, text, port=443, literal=False):
    verdict = rules.check_address(ipaddress.ip_address(text), port, literal=literal)
    return verdict.allowed, verdict.reason


class EmbeddedAddressTest(unittest.TestCase):
    """IP rules, deny and allow, see the IPv4 address inside IPv4-mapped, NAT64 and 6to4
    addresses, as the private-address check does: a deny rule for 1.1.1.1 also denies
    ::ffff:1.1.1.1, 64:ff9b::101:101 and 2002:101:101::1."""

    READINGS = [
        ("::ffff:10.0.0.5", ["10.0.0.5"]),
        ("64:ff9b::a00:5", ["10.0.0.5"]),
        ("64:ff9b::101:101", ["1.1.1.1"]),
        ("2002:a00:5::1", ["10.0.0.5"]),
        ("2002:101:101::", ["1.1.1.1"]),
        # local-use NAT64: every RFC 6052 layout (/48, /56, /64, /96) its operator may pick
        ("64:ff9b:1::a00:5", ["0.0.0.0", "0.0.0.10", "10.0.0.5"]),
        ("64:ff9b:1:a00:0:500::", ["10.0.0.5", "0.0.5.0", "0.5.0.0", "0.0.0.0"]),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", []),   # Teredo: blocked whole, not decoded
        ("2606:4700::1111", []),
        ("10.0.0.5", []),
    ]

    # (allow rules, deny rules, allow_private, resolved address, port, allowed, reason)
    TABLE = [
        # a deny rule must not be escaped through IPv4-mapped, NAT64 or 6to4 forms
        (["example.com"], ["1.1.1.1"], False, "64:ff9b::101:101", 443, False, "denied-by-rule"),
        (["example.com"], ["1.1.1.1"], False, "2002:101:101::1", 443, False, "denied-by-rule"),
        (["example.com"], ["1.1.1.1"], False, "::ffff:1.1.1.1", 443, False, "denied-by-rule"),
        (["example.com"], ["1.1.1.1"], False, "64:ff9b:1::101:101", 443, False, "denied-by-rule"),
        (["example.com"], ["1.1.1.1"], False, "1.1.1.2", 443, True, "allowed-by-rule"),
        (["example.com"], ["1.1.1.1"], False, "64:ff9b::101:102", 443, True, "allowed-by-rule"),
        (["example.com"], ["10.0.0.0/8"], True, "64:ff9b::a00:5", 443, False, "denied-by-rule"),
        (["example.com"], ["10.0.0.0/8"], True, "2002:a00:5::1", 443, False, "denied-by-rule"),
        (["example.com"], ["10.0.0.0/8"], True, "::ffff:10.0.0.5", 443, False, "denied-by-rule"),
        (["example.com"], ["10.0.0.0/8"], True, "64:ff9b:1:a00:0:500::", 443, False, "denied-by-rule"),
        (["example.com"], ["10.0.0.0/8"], True, "192.168.1.1", 443, True, "allowed-by-rule"),
        (["example.com"], ["10.0.0.0/8"], True, "64:ff9b::c0a8:101", 443, True, "allowed-by-rule"),
        (["example.com"], ["10.0.0.0/8:22"], True, "64:ff9b::a00:5", 443, True, "allowed-by-rule"),
        # an IPv6 deny rule still matches the IPv6 address itself
        (["example.com"], ["[64:ff9b::]/96"], False, "64:ff9b::808:808", 443, False, "denied-by-rule"),
        # allow rules: only an exact translation reaches the rule's address, and no NAT64
        # gateway translates a private one (RFC 6052); a 6to4 address is a relay's host
        (["example.com", "10.0.0.0/8:443"], [], False, "64:ff9b::a00:5", 443, False, "private-address"),
        (["example.com", "10.0.0.0/8:443"], [], False, "2002:a00:5::1", 443, False, "private-address"),
        (["example.com", "10.0.0.0/8:443"], [], False, "64:ff9b::a00:5", 80, False, "private-address"),
        (["example.com", "10.0.0.0/8:443"], [], False, "64:ff9b::7f00:1", 443, False, "private-address"),
        # an allow rule must hold for every reading of an ambiguous local-use NAT64 address
        (["example.com", "10.0.0.5"], [], False, "64:ff9b:1::a00:5", 443, False, "private-address"),
        (["example.com", "[64:ff9b:1::a00:5]"], [], False, "64:ff9b:1::a00:5", 443, True, "allowed-by-rule"),
    ]

    def test_readings(self):
        for text, expected in self.READINGS:
            with self.subTest(address=text):
                found = socks_filter.embedded_ipv4(ipaddress.ip_address(text))
                self.assertEqual(found, [ipaddress.ip_address(a) for a in expected])

    def test_rules_see_the_carried_address(self):
        for allow, deny, private, address, port, allowed, reason in self.TABLE:
            with self.subTest(allow=allow, deny=deny, address=address, port=port):
                rules = Policy([parse_rule(r) for r in allow], [parse_rule(r, deny=True) for r in deny],
                               allow_private=private)
                self.assertEqual(verdict_of(rules, address, port), (allowed, reason))

    def test_literals_too(self):
        rules = Policy([parse_rule("*.example.com")], [parse_rule("8.8.8.0/24", deny=True)])
        for host in ("64:ff9b::808:808", "[2002:808:808::]", "::ffff:8.8.8.8"):
            with self.subTest(host=host):
                self.assertEqual(rules.check_request(host, 443).reason, "denied-by-rule")


class PlatformEndpointTest(unittest.TestCase):
    """Cloud platform endpoints, one table, refused in every form unless an allow rule for
    exactly that address names them, even with --allow-private. "Exactly" means a single-address
    rule (/32, /128) for the endpoint or for its IPv4 address when the endpoint is a wrapping of
    it; a network that merely contains it (169.254.0.0/16, fd00::/8) is not enough. The table
    covers more than 169.254.169.254, e.g. 168.63.129.16."""

    WRAPPED = ["::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1",
               "64:ff9b::a83f:8110", "2002:a83f:8110::", "64:ff9b::6464:64c8", "64:ff9b::c000:c0"]

    def test_the_table_has_the_known_endpoints(self):
        for text in ("169.254.169.254", "168.63.129.16", "100.100.100.200", "fd00:ec2::254",
                     "192.0.0.192", "169.254.170.2", "fd20:ce::254"):
            with self.subTest(address=text):
                self.assertIn(ipaddress.ip_address(text), socks_filter.PLATFORM_ENDPOINTS)

    def test_refused_with_and_without_allow_private(self):
        for private in (False, True):
            rules = policy("example.com", "93.184.216.0/24", allow_private=private)
            for address in [*map(str, socks_filter.PLATFORM_ENDPOINTS), *self.WRAPPED]:
                with self.subTest(address=address, allow_private=private):
                    self.assertEqual(verdict_of(rules, address), (False, "platform-endpoint"))
                    self.assertEqual(verdict_of(rules, address, literal=True),
                                     (False, "platform-endpoint"))
                    self.assertFalse(socks_filter.is_public_address(ipaddress.ip_address(address)))

    def test_a_broad_rule_that_contains_one_is_not_enough(self):
        for rule, address in (("169.254.0.0/16", "169.254.169.254"), ("168.63.0.0/16", "168.63.129.16"),
                              ("100.64.0.0/10", "100.100.100.200"), ("[fd00::]/16", "fd00:ec2::254"),
                              ("192.0.0.0/24", "192.0.0.192"), ("[64:ff9b::]/96", "64:ff9b::a9fe:a9fe"),
                              ("169.254.169.0/24:80", "169.254.169.254")):
            with self.subTest(rule=rule):
                rules = policy("example.com", rule, allow_private=True)
                self.assertEqual(verdict_of(rules, address, 80), (False, "platform-endpoint"))

    def test_an_exact_rule_allows_it_on_its_port_only(self):
        rules = policy("metadata.example.com", "169.254.169.254:80", "[fd00:ec2::254]", "168.63.129.16")
        self.assertEqual(verdict_of(rules, "169.254.169.254", 80), (True, "allowed-by-rule"))
        # RFC 6052 forbids translating link-local: the NAT64 form is not this endpoint
        self.assertEqual(verdict_of(rules, "64:ff9b::a9fe:a9fe", 80), (False, "platform-endpoint"))
        self.assertEqual(verdict_of(rules, "169.254.169.254", 443), (False, "platform-endpoint"))
        self.assertEqual(verdict_of(rules, "fd00:ec2::254", 80), (True, "allowed-by-rule"))
        self.assertEqual(verdict_of(rules, "168.63.129.16", 32526), (True, "allowed-by-rule"))
        self.assertEqual(rules.check_request("169.254.169.254", 80).reason, "allowed-by-rule")
        denied = policy("169.254.169.254", deny=["169.254.169.254"])
        self.assertEqual(verdict_of(denied, "169.254.169.254", 80), (False, "denied-by-rule"))

    def test_neighbours_are_ordinary_public_addresses(self):
        rules = policy("example.com")
        for text in ("168.63.129.15", "168.63.129.17", "100.100.100.201"):
            with self.subTest(address=text):
                expected = (True, "allowed-by-rule") if text.startswith("168.") else (False, "private-address")
                self.assertEqual(verdict_of(rules, text), expected)

    def test_the_summary_never_suggests_allowing_one(self):
        import bw_lib
        line = json.dumps({"event": "decision", "id": 1, "host": "169.254.169.254", "port": 80,
                           "decision": "deny", "reason": "platform-endpoint"})
        text = bw_lib.summarize("bw-claude", [line])
        self.assertIn("cloud platform endpoint", text)
        self.assertIn("allow only if you mean it", text)
        self.assertNotIn("--allow-domain", text)

    def test_audit_mode_and_detail(self):
        rules = policy(mode="audit")
        verdict = rules.check_request("168.63.129.16", 80)
        self.assertEqual((verdict.allowed, verdict.reason), (False, "platform-endpoint"))
        self.assertIn("Azure WireServer", verdict.detail)
        self.assertIn("exactly", verdict.detail)


class AllowPrivateTest(unittest.TestCase):
    """--allow-private opens the private-use networks to allowed names, and nothing else:
    loopback, link-local, shared, multicast, reserved and documentation addresses, and their
    wrapped forms, stay closed."""

    OPENED = ["10.0.0.5", "172.16.0.1", "172.31.255.255", "192.168.1.1", "fc00::1", "fd12:3456::1",
              "::ffff:192.168.0.1", "64:ff9b::a00:5", "2002:c0a8:101::1"]
    STILL_CLOSED = ["127.0.0.1", "127.8.9.10", "::1", "0.0.0.0", "0.1.2.3", "::", "169.254.1.1",
                    "fe80::1", "100.64.0.1", "100.127.255.254", "224.0.0.1", "239.255.255.250",
                    "ff02::1", "255.255.255.255", "240.0.0.1", "192.0.2.1", "198.18.0.1", "192.0.0.8",
                    "64:ff9b::7f00:1", "2002:7f00:1::", "::ffff:127.0.0.1", "64:ff9b::6440:1",
                    "64:ff9b:1::a00:5", "fec0::1", "2001::1", "::127.0.0.1", "2001:db8::1"]

    def test_private_use_only(self):
        rules = policy("intranet.example.com", allow_private=True)
        for text in self.OPENED:
            with self.subTest(address=text):
                self.assertEqual(verdict_of(rules, text), (True, "allowed-by-rule"))
        for text in self.STILL_CLOSED:
            with self.subTest(address=text):
                self.assertEqual(verdict_of(rules, text), (False, "private-address"))

    def test_an_ip_rule_still_opens_the_rest(self):
        rules = policy("intranet.example.com", "127.0.0.1:8080", "[::1]:8080", allow_private=True)
        self.assertEqual(verdict_of(rules, "127.0.0.1", 8080), (True, "allowed-by-rule"))
        self.assertEqual(verdict_of(rules, "::1", 8080), (True, "allowed-by-rule"))
        self.assertEqual(verdict_of(rules, "127.0.0.1", 8081), (False, "private-address"))

    def test_the_detail_says_what_would_reach_it(self):
        rules = policy("intranet.example.com")
        loopback = rules.check_address(ipaddress.ip_address("127.0.0.1"), 80)
        self.assertIn("loopback", loopback.detail)
        self.assertIn("only an IP rule", loopback.detail)
        lan = rules.check_address(ipaddress.ip_address("64:ff9b::a00:5"), 80)
        self.assertIn("NAT64 form of private-use", lan.detail)
        self.assertIn("--allow-private", lan.detail)

    def test_every_reason_has_words_for_people(self):
        import bw_lib
        for reason in ("private-address", "platform-endpoint", "denied-by-rule",
                       "ip-literal-not-allowed", "not-in-allowlist", "bad-name", "bad-port"):
            with self.subTest(reason=reason):
                text, _ = socks_filter.REASONS[reason]
                self.assertEqual(bw_lib.reason_text(reason), text)
                self.assertNotEqual(text, reason)


class BroadDenyRuleTest(unittest.TestCase):
    """Breadth is refused in allow rules only: broad denied names and networks, even 0.0.0.0/0
    and ::/0, are accepted as deny rules."""

    BROAD = ["*:22", "*", "[fc00::]/7", "0.0.0.0/0", "[::]/0", "2.0.0.0/7", "*.com", "com",
             "*.co.uk", "*.github.io", "localhost", "localhost:631"]

    def test_accepted_in_deny_refused_in_allow(self):
        for text in self.BROAD:
            with self.subTest(rule=text):
                self.assertTrue(parse_rule(text, deny=True).deny)
                with self.assertRaises(RuleError):
                    parse_rule(text)

    def test_port_only_rule(self):
        rules = policy("example.com", "93.184.216.34", "*.example.org", deny=["*:22"])
        self.assertEqual(rules.check_request("example.com", 22).reason, "denied-by-rule")
        self.assertEqual(rules.check_request("a.example.org", 22).reason, "denied-by-rule")
        self.assertEqual(rules.check_request("93.184.216.34", 22).reason, "denied-by-rule")
        self.assertEqual(verdict_of(rules, "93.184.216.34", 22), (False, "denied-by-rule"))
        self.assertEqual(rules.check_request("example.com", 443).reason, "allowed-by-rule")
        self.assertEqual(rules.check_request("example.com", 2222).reason, "allowed-by-rule")

    def test_broad_networks_and_names(self):
        rules = policy("example.com", "*.example.net", allow_private=True,
                       deny=["[fc00::]/7", "*.net", "localhost"])
        self.assertEqual(verdict_of(rules, "fd00::1"), (False, "denied-by-rule"))
        self.assertEqual(verdict_of(rules, "10.0.0.5"), (True, "allowed-by-rule"))
        self.assertEqual(rules.check_request("a.example.net", 443).reason, "denied-by-rule")
        self.assertEqual(rules.check_request("localhost", 443).reason, "denied-by-rule")
        everything = policy("example.com", deny=["0.0.0.0/0"])
        self.assertEqual(verdict_of(everything, "93.184.216.34"), (False, "denied-by-rule"))
        self.assertEqual(verdict_of(everything, "64:ff9b::5db8:d822"), (False, "denied-by-rule"))
        self.assertEqual(verdict_of(everything, "2606:4700::1111"), (True, "allowed-by-rule"))

    def test_the_command_line_parses_deny_as_deny(self):
        args = socks_filter.build_parser().parse_args(
            ["--listen", "127.0.0.1:0", "--allow", "example.com", "--deny", "*:22", "--deny", "[fc00::]/7"])
        rules = socks_filter.policy_from_args(args)
        self.assertEqual(rules.check_request("example.com", 22).reason, "denied-by-rule")
        args = socks_filter.build_parser().parse_args(["--listen", "127.0.0.1:0", "--allow", "*:22"])
        with self.assertRaises(RuleError):
            socks_filter.policy_from_args(args)


class SyntaxTest(unittest.TestCase):
    """Leading zeros in ports, '_' in names, IPv6 zone ids, and '**.' (refused)."""

    def test_ports_with_leading_zeros_are_refused(self):
        # "0443" is not a way to write 443 here
        for text in ("example.com:0443", "[::1]:080", "1.2.3.4:00080", "10.0.0.0/8:022", "*.example.com:01"):
            with self.subTest(rule=text):
                with self.assertRaisesRegex(RuleError, "leading zeros"):
                    parse_rule(text)
        with self.assertRaises(RuleError):
            parse_rule("*:022", deny=True)
        self.assertEqual(parse_rule("example.com:10").port, 10)

    def test_underscore_in_labels(self):
        # real names: DMARC, SRV and DKIM records, some hosts
        for text in ("_dmarc.example.com", "foo_bar.example.com", "*._tcp.example.com", "_a.b_.example.com:443"):
            with self.subTest(rule=text):
                self.assertIn(parse_rule(text).kind, ("name", "wildcard"))
        rules = policy("_dmarc.example.com", "*.example.org")
        for host in ("_dmarc.example.com", "_DMARC.Example.com.", "foo_bar.example.org"):
            with self.subTest(host=host):
                self.assertEqual(rules.check_request(host, 443).reason, "allowed-by-rule")
        self.assertEqual(rules.check_request("dmarc.example.com", 443).reason, "not-in-allowlist")
        self.assertEqual(socks_filter.parse_authority("_dmarc.example.com:443"), ("_dmarc.example.com", 443))

    def test_zone_ids_are_refused(self):
        # a zone picks the host's interface, which no rule here means, so they are refused in
        # rules and hosts
        for text in ("[fe80::1%eth0]", "[fe80::1%25eth0]", "[fe80::1%eth0]:443", "fe80::1%eth0",
                     "[fe80::%1]/64"):
            with self.subTest(rule=text):
                with self.assertRaises(RuleError):
                    parse_rule(text)
                with self.assertRaises(RuleError):
                    parse_rule(text, deny=True)
        rules = policy("[fe80::1]", "[::1]")
        for host in ("fe80::1%eth0", "[fe80::1%eth0]", "fe80::1%25eth0", "::1%lo", "[::1%1]"):
            with self.subTest(host=host):
                self.assertIsNone(socks_filter.parse_ip_spelling(host))
                self.assertEqual(rules.check_request(host, 443).reason, "bad-name")

    def test_apex_and_subdomains_in_one_rule_is_refused_with_a_hint(self):
        # "**.example.com" (the name and its subdomains) is two rules here
        with self.assertRaisesRegex(RuleError, r"example\.com and \*\.example\.com"):
            parse_rule("**.example.com")


class OwnAddressTest(unittest.TestCase):
    """This machine's own interface addresses count as loopback, so a name that resolves to one
    (an attacker's record under an allowed wildcard pointing at the host's global IPv6 address)
    does not reach services listening on all interfaces. An IP rule still reaches them."""

    FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 203.0.113.0/24 2 0 2
           |-- 203.0.113.0
              /24 link UNICAST
           |-- 203.0.113.7
              /32 host LOCAL
"""
    IF_INET6 = ("00000000000000000000000000000001 01 80 10 80       lo\n"
                "2a0100000000000000000000000000ab 02 40 00 00     eth0\n")

    def test_reading_the_kernel_tables(self):
        self.assertEqual(socks_filter._local_ipv4(self.FIB_TRIE.splitlines()),
                         [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("203.0.113.7")])
        self.assertEqual(socks_filter._inet6_addresses(self.IF_INET6.splitlines()),
                         [ipaddress.ip_address("::1"), ipaddress.ip_address("2a01::ab")])
        here = socks_filter.own_addresses()
        self.assertIn(ipaddress.ip_address("127.0.0.1"), here)

    def test_names_do_not_reach_this_machine(self):
        own = frozenset(map(ipaddress.ip_address, ("93.184.216.34", "2a01::ab", "10.0.0.5")))
        rules = Policy([parse_rule("*.example.com")], allow_private=True, own=own)
        for text in ("93.184.216.34", "2a01::ab", "10.0.0.5", "64:ff9b::5db8:d822", "::ffff:93.184.216.34"):
            with self.subTest(address=text):
                verdict = rules.check_address(ipaddress.ip_address(text), 443)
                self.assertEqual((verdict.allowed, verdict.reason), (False, "private-address"))
                self.assertIn("own address", verdict.detail)
        self.assertEqual(verdict_of(rules, "93.184.216.35"), (True, "allowed-by-rule"))
        opened = Policy([parse_rule("*.example.com"), parse_rule("93.184.216.34:443")], own=own)
        self.assertEqual(verdict_of(opened, "93.184.216.34"), (True, "allowed-by-rule"))

    def test_the_command_line_reads_them(self):
        args = socks_filter.build_parser().parse_args(["--listen", "127.0.0.1:0", "--allow", "example.com"])
        self.assertEqual(socks_filter.policy_from_args(args).own, socks_filter.own_addresses())


if __name__ == "__main__":
    unittest.main()


class AllowRuleWrappingTest(unittest.TestCase):
    """An allow rule for an IPv4 address matches that address, its IPv4-mapped form and, for
    a public address, its well-known-prefix NAT64 form (an exact translation), never a 6to4 or
    local-use NAT64 address that merely embeds it: those are global IPv6 destinations (a 6to4
    relay's host, another operator's NAT64), so --host-port 8000 (rule 127.0.0.1:8000) or a
    learned 93.184.216.34:443 must not open them. Deny rules still match every reading."""

    # (allow rule, address, port, allowed, reason)
    TABLE = [
        ("127.0.0.1:8000", "127.0.0.1", 8000, True, "allowed-by-rule"),
        ("127.0.0.1:8000", "::ffff:127.0.0.1", 8000, True, "allowed-by-rule"),
        ("127.0.0.1:8000", "2002:7f00:1::", 8000, False, "private-address"),
        ("127.0.0.1:8000", "2002:7f00:1:5::9", 8000, False, "private-address"),
        ("127.0.0.1:8000", "64:ff9b::7f00:1", 8000, False, "private-address"),
        ("127.0.0.1:8000", "64:ff9b:1:7f00:0:100::", 8000, False, "private-address"),
        ("93.184.216.34:443", "93.184.216.34", 443, True, "allowed-by-rule"),
        ("93.184.216.34:443", "64:ff9b::5db8:d822", 443, True, "allowed-by-rule"),
        ("93.184.216.34:443", "2002:5db8:d822::1", 443, False, "private-address"),
        ("93.184.216.34:443", "64:ff9b:1::5db8:d822", 443, False, "private-address"),
        ("93.184.216.34:443", "64:ff9b:1:5db8:d8:2200::", 443, False, "private-address"),
        ("93.184.216.34:443", "64:ff9b::5db8:d822", 80, False, "ip-literal-not-allowed"),
        ("10.0.0.0/8", "64:ff9b::a00:5", 443, False, "private-address"),
        ("100.64.0.0/10", "64:ff9b::6440:1", 443, False, "private-address"),
        # a rule naming the IPv6 address itself still matches it
        ("[2002:7f00:1::]:8000", "2002:7f00:1::", 8000, True, "allowed-by-rule"),
        ("[64:ff9b::7f00:1]:8000", "64:ff9b::7f00:1", 8000, True, "allowed-by-rule"),
    ]

    def test_table(self):
        for rule, address, port, allowed, reason in self.TABLE:
            with self.subTest(rule=rule, address=address, port=port):
                rules = policy(rule)
                self.assertEqual(verdict_of(rules, address, port, literal=True), (allowed, reason))
                self.assertEqual(rules.check_request(address, port).reason, reason)

    def test_the_pure_reading(self):
        for text, expected in (("::ffff:10.0.0.5", "10.0.0.5"), ("64:ff9b::5db8:d822", "93.184.216.34"),
                               ("64:ff9b::7f00:1", None), ("64:ff9b::a00:5", None),
                               ("64:ff9b::a9fe:a9fe", None), ("2002:5db8:d822::", None),
                               ("64:ff9b:1::5db8:d822", None), ("2606:4700::1111", None),
                               ("93.184.216.34", None)):
            with self.subTest(address=text):
                found = socks_filter.translated_ipv4(ipaddress.ip_address(text))
                self.assertEqual(found, expected and ipaddress.ip_address(expected))

    def test_deny_rules_still_match_every_reading(self):
        rules = Policy([parse_rule("example.com")], [parse_rule("127.0.0.1:8000", deny=True),
                                                      parse_rule("93.184.216.34", deny=True)])
        for address, port in (("2002:7f00:1::", 8000), ("64:ff9b::7f00:1", 8000),
                              ("64:ff9b:1::7f00:1", 8000), ("2002:5db8:d822::1", 443),
                              ("64:ff9b::5db8:d822", 443), ("64:ff9b:1:5db8:d8:2200::", 443)):
            with self.subTest(address=address):
                self.assertEqual(verdict_of(rules, address, port), (False, "denied-by-rule"))
