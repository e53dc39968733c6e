"""Issue 12: an allowed rule carries exactly what it names, and filtering is always enforced.

Unit tests of the pure parts (rules, the first bytes of a tunnel, credentials, options, the exit
summary, the learn file), then end-to-end tests through the real bridge: `bw-claude
--filter-network --shell`, real bwrap, socat, curl and socks_filter.py, with upstreams on the
host's 127.0.0.1.

    RawRuleTest            the :PORT/raw syntax; default profile rules name their ports
    TunnelStartTest        what may open a tunnel to a name (alert, CCS, heartbeat, data, no SNI)
    CredentialTest         HTTP Basic and RFC 1929 parsing
    OptionsTest            --filter-network implies --unshare-net; --host-port; the token
    SummaryTest            failures counted apart, the real fix for private names, quiet hosts,
                           a narrow terminal
    LearnRawTest           --learn writes host:port/raw for a stream that was not TLS
    BridgeTest             end to end: ports on defaults, refusals on a non-443 port, a raw rule
                           for ssh-like traffic, only `lo` inside, --host-port, summary counts
    AdvisoryBridgeTest     --filter-network --share-net: another user cannot use the bridge
    QuietLineTest          the real CLIs against tests/fake_apis.py: what they contact besides
                           their API is summed up on the quiet line, not listed as blocked

The wrapper runs under `unshare -rm` with a private /etc/hosts (test names -> 127.0.0.1, one
-> 10.1.2.3, which is refused before any connect) and /etc/resolv.conf (nameserver 127.0.0.1,
where nothing answers): no lookup and no connection ever leaves the machine.
"""

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import bw_lib
import socks_filter
from tests.test_proxy_adversarial import built_client_hello, client_hello
from tests.test_real_cli import RealCLITest
from tests.test_sandbox import missing, require_sandbox

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BW_CLAUDE = os.path.join(REPO, "bw-claude")
NAME = "tls.bw-test.example"        # pinned to 127.0.0.1
LAN = "lan.bw-test.example"         # pinned to 10.1.2.3 (never connected to: refused first)
GONE = "gone.bw-test.example"       # not in the hosts file: the lookup fails (no DNS answers)
HOSTS = (f"127.0.0.1 localhost\n127.0.0.1 {NAME} api.anthropic.com claude.ai "
         f"raw.githubusercontent.com\n10.1.2.3 {LAN}\n")
RESOLV = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
PINNED = 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"'
ALERT = bytes.fromhex("15 03 01 00 02 01 5a")          # a TLS warning alert (issue 12)
SSH_BANNER = b"SSH-2.0-fake_server\r\n"


# ---------------------------------------------------------------------------------------------
# Pure parts

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
                self.assertIn(reason, bw_lib.REASONS)
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


class OptionsTest(unittest.TestCase):
    def parse(self, *argv, defaults=()):
        return bw_lib.parse_args(bw_lib.PROFILES["claude"], list(argv), list(defaults))

    def test_filter_network_is_enforced_on_its_own(self):
        self.assertTrue(self.parse("--filter-network").unshare_net)
        self.assertFalse(self.parse("--filter-network", "--share-net").unshare_net)
        self.assertFalse(self.parse().unshare_net)
        opts = self.parse("--filter-network")
        self.assertIsNone(bw_lib.advisory_token(opts))
        advisory = self.parse("--filter-network", "--share-net")
        one, two = bw_lib.advisory_token(advisory), bw_lib.advisory_token(advisory)
        self.assertNotEqual(one, two)
        self.assertRegex(one, r"^[A-Za-z0-9_-]{32}$")

    def test_host_ports(self):
        opts = self.parse("--filter-network", "--host-port", "8000", "--host-port", "5432:6543")
        self.assertEqual(opts.host_port, [(8000, 8000), (5432, 6543)])
        from_file = self.parse(defaults=["--filter-network", "--host-port", "3000"])
        self.assertEqual(from_file.host_port, [(3000, 3000)])
        self.assertEqual(self.parse("--filter-network", "--share-net",
                                    defaults=["--host-port", "3000"]).host_port, [])
        for argv in (["--host-port", "80"], ["--filter-network", "--share-net", "--host-port", "80"],
                     ["--filter-network", "--host-port", "0"], ["--filter-network", "--host-port", "080"],
                     ["--filter-network", "--host-port", "1:70000"],
                     ["--filter-network", "--host-port", "a:b"],
                     ["--filter-network", "--host-port", "8000:"],
                     ["--filter-network", "--host-port", "80", "--host-port", "80:81"]):
            with self.subTest(argv=argv), self.assertRaises(bw_lib.Failure) as caught:
                self.parse(*argv)
            self.assertEqual(caught.exception.code, 2)

    def test_loopback_rules_get_a_hint(self):
        hints = bw_lib.loopback_hints(["127.0.0.1:8001", "127.0.0.0/8:9000", "[::1]:3000",
                                       "127.0.0.2:8080", "example.com:443"])
        self.assertEqual(len(hints), 3, hints)
        self.assertIn("--host-port 8001", hints[0])
        self.assertIn("--host-port 3000", hints[2])


def record(event="decision", decision="allow", reason="allowed-by-rule", **fields):
    return json.dumps({"event": event, "decision": decision, "reason": reason, **fields})


class SummaryTest(unittest.TestCase):
    def test_failed_connections_are_counted_apart_with_their_reason(self):
        lines = [record(id=1, host="api.anthropic.com", port=443)]
        for i in range(2, 8):
            lines += [record(id=i, host="api.anthropic.com", port=443),
                      record("close", reason="lookup-failed", id=i, host="api.anthropic.com", port=443)]
        lines += [record(id=9, host="a.example", port=443),
                  record("close", reason="connect-refused", id=9, host="a.example", port=443)]
        text = bw_lib.summarize("bw-claude", lines)
        self.assertTrue(text.startswith("bw-claude: network: 1 allowed, 0 blocked, 7 failed"), text)
        self.assertIn("api.anthropic.com:443 x6 (DNS lookup failed)", text)
        self.assertIn("a.example:443 (connection refused)", text)

    def test_a_private_name_gets_the_real_fix(self):
        lines = [record(decision="deny", reason="private-address", id=1, host="learn.bars.test",
                        port=8000, address="10.0.0.5:8000")]
        text = bw_lib.summarize("bw-claude", lines)
        self.assertIn("--allow-domain 10.0.0.5:8000 (only if you mean it) or --allow-private", text)
        self.assertNotIn("--allow-domain learn.bars.test", text)
        verdict = socks_filter.Verdict(False, "private-address", "learn.bars.test resolves to 10.0.0.5")
        message = socks_filter.denial_message("learn.bars.test", 8000, verdict,
                                              socks_filter.ipaddress.ip_address("10.0.0.5"))
        self.assertIn("IP rule '10.0.0.5:8000'", message)
        self.assertIn("--allow-private", message)
        self.assertNotIn("rule 'learn.bars.test:8000'", message)
        # --allow-private opens only private-use networks: for loopback, the IP rule alone
        lines = [record(decision="deny", reason="private-address", id=1, host="loop.bars.test",
                        port=8000, address="127.0.0.1:8000")]
        text = bw_lib.summarize("bw-claude", lines)
        self.assertIn("--allow-domain 127.0.0.1:8000 (only if you mean it)", text)
        self.assertNotIn("--allow-private", text)
        message = socks_filter.denial_message("loop.bars.test", 8000, verdict,
                                              socks_filter.ipaddress.ip_address("127.0.0.1"))
        self.assertIn("IP rule '127.0.0.1:8000'", message)
        self.assertNotIn("--allow-private", message)

    def test_hosts_blocked_by_design_are_one_quiet_line(self):
        lines = [record(decision="deny", reason="not-in-allowlist", id=i, host=host, port=443)
                 for i, host in enumerate(["play.googleapis.com"] * 2 + ["registry.npmjs.org",
                                                                          "evil.example"])]
        expected = bw_lib.PROFILES["gemini"].expected_blocked
        text = bw_lib.summarize("bw-gemini", lines, width=200, expected=expected)
        self.assertTrue(text.startswith("bw-gemini: network: 0 allowed, 1 blocked:"), text)
        quiet = [line for line in text.splitlines() if "by design" in line]
        self.assertEqual(len(quiet), 1, text)
        self.assertIn("play.googleapis.com:443 x2, registry.npmjs.org:443", quiet[0])
        self.assertNotIn("--allow-domain play", text)
        self.assertIn("--allow-domain evil.example:443", text)

    def test_a_narrow_terminal_never_cuts_a_word(self):
        lines = [record(decision="deny", reason="not-in-allowlist", id=i,
                        host=f"host-number-{i}.registry.example.com", port=443) for i in range(4)]
        lines += [record(id=9, host="x.example", port=443),
                  record("close", reason="lookup-failed", id=9, host="x.example", port=443)]
        one_line = bw_lib.summarize("bw-claude", lines)
        for width in (30, 50, 79):
            with self.subTest(width=width):
                text = bw_lib.summarize("bw-claude", lines, width=width)
                self.assertEqual(" ".join(line.strip() for line in text.splitlines()), one_line)
                words = set(one_line.split())
                self.assertTrue(all(word in words for line in text.splitlines() for word in line.split()))
                self.assertTrue(all(len(line) <= width or " " not in line.strip()
                                    for line in text.splitlines()), text)

    def test_tunnel_refusals_suggest_a_raw_rule_only_when_it_could_be_meant(self):
        lines = [record(decision="deny", reason="not-tls", id=1, host="github.com", port=22),
                 record(decision="deny", reason="tls-alert-first", id=2, host="claude.ai", port=443)]
        text = bw_lib.summarize("bw-claude", lines)
        self.assertIn("--allow-domain github.com:22/raw", text)
        self.assertIn("claude.ai:443 (TLS alert before the ClientHello);", text + ";")


class LearnRawTest(unittest.TestCase):
    def test_a_stream_that_was_not_tls_is_learned_as_raw(self):
        records = [
            {"event": "decision", "id": 1, "decision": "deny", "enforced": False, "proto": "socks5",
             "host": "github.com", "port": 22, "reason": "not-in-allowlist", "tunnel": "raw"},
            {"event": "close", "id": 1, "reason": "closed", "address": "140.82.121.3:22"},
            {"event": "decision", "id": 2, "decision": "deny", "enforced": False,
             "proto": "http-connect", "host": "pypi.org", "port": 443, "reason": "not-in-allowlist",
             "tunnel": "tls"},
            {"event": "close", "id": 2, "reason": "closed", "address": "151.101.0.223:443"},
            {"event": "decision", "id": 3, "decision": "deny", "enforced": False, "proto": "socks5",
             "host": "140.82.121.4", "port": 22, "reason": "ip-literal-not-allowed"},
            {"event": "close", "id": 3, "reason": "closed", "address": "140.82.121.4:22"},
        ]
        text, count = bw_lib.format_learned("bw-claude", bw_lib.learned(records), "today")
        rules = [line.split()[0] for line in text.splitlines() if not line.startswith("#")]
        self.assertEqual(rules, ["140.82.121.4:22", "github.com:22/raw", "pypi.org:443"])
        self.assertEqual(count, 3)
        for rule in rules:
            socks_filter.parse_rule(rule)


# ---------------------------------------------------------------------------------------------
# End to end: the real bridge

class Upstream:
    """A TCP server on the host's 127.0.0.1: records what each connection sent; "ssh" mode
    first sends SSH_BANNER, "http" mode answers one request with `ok`."""

    def __init__(self, mode="record"):
        self.mode, self.received, self.accepted = mode, [], 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn):
        data = b""
        with conn:
            conn.settimeout(3)
            try:
                if self.mode == "ssh":
                    conn.sendall(SSH_BANNER)
                end = {"ssh": b"\r\n", "http": b"\r\n\r\n"}.get(self.mode)
                while end is None or end not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if self.mode == "http" and data:
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            except OSError:
                pass
        self.received.append(data)

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


class BridgeCase(unittest.TestCase):
    """Runs `bw-claude ... --shell -- -c SCRIPT` with names pinned to loopback (see above)."""

    @classmethod
    def setUpClass(cls):
        require_sandbox("socat", "curl")
        for tool in ("unshare", "mount"):
            if not shutil.which(tool):
                missing(f"{tool} is not installed (apt-get install util-linux mount)")

    def setUp(self):
        self.root = os.path.realpath(tempfile.mkdtemp(prefix="bw-netrules-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        for name in ("home", "project", "run"):
            os.makedirs(os.path.join(self.root, name), 0o700)
        self.project = os.path.join(self.root, "project")
        self.runtime = os.path.join(self.root, "run")
        self.log = os.path.join(self.root, "proxy.jsonl")
        for name, text in (("hosts", HOSTS), ("resolv.conf", RESOLV)):
            with open(os.path.join(self.root, name), "w") as f:
                f.write(text)
        self.env = {"HOME": os.path.join(self.root, "home"), "PATH": "/usr/bin:/bin",
                    "LANG": "C.UTF-8", "XDG_RUNTIME_DIR": self.runtime}
        probe = subprocess.run(self.pinned(["grep", "-q", NAME, "/etc/hosts"]), capture_output=True,
                               timeout=20)
        if probe.returncode != 0:
            missing("needs `unshare -rm` and `mount` for a private /etc/hosts: "
                    + probe.stderr.decode(errors="replace").strip())

    def pinned(self, argv):
        return ["unshare", "-rm", "sh", "-c", PINNED, "sh", os.path.join(self.root, "hosts"),
                os.path.join(self.root, "resolv.conf"), *argv]

    def upstream(self, mode="record"):
        server = Upstream(mode)
        self.addCleanup(server.stop)
        return server

    def put(self, name, data):
        with open(os.path.join(self.project, name), "wb") as f:
            f.write(data)

    def bw(self, *argv, script, pinned=True, timeout=90):
        command = [sys.executable, BW_CLAUDE, "--no-defaults", *argv, "--proxy-log", self.log,
                   "--shell", "--", "-c", script]
        result = subprocess.run(self.pinned(command) if pinned else command, cwd=self.project,
                                env=self.env, capture_output=True, text=True, timeout=timeout)
        self.assertEqual(os.listdir(self.runtime), [], "the session left its directory")
        return result

    def decisions(self):
        with open(self.log) as f:
            return [r for r in map(json.loads, f) if r["event"] == "decision"]

    def summary(self, result):
        return [line for line in result.stderr.splitlines() if "network:" in line][-1]


def loopback(server):
    """The IP rule that lets names pinned to 127.0.0.1 reach `server` (an IP rule is the one
    way to a loopback address; --allow-private opens only private-use networks)."""
    return ["--allow-domain", f"127.0.0.1:{server.port}"]


def tunnel(data_file, host, port, via="$HTTPS_PROXY"):
    """Shell: send a file's bytes through a proxy tunnel to host:port with real curl, print
    what came back (hex) and curl's status."""
    proxy = f'-p -x "{via}"' if via == "$HTTPS_PROXY" else f'-x "{via}"'
    return (f"curl -sS -m 8 {proxy} telnet://{host}:{port} < {data_file} | od -An -tx1 | tr -d ' \\n';"
            f" echo ' rc='$?")


class BridgeTest(BridgeCase):
    def test_default_rules_are_for_port_443(self):
        """CONNECT claude.ai:8443 or :80 is not the profile's claude.ai: refused before any
        lookup, and nothing listening on the host's loopback at that port is reached."""
        script = "; ".join(
            f"curl -sS -m 8 -o /dev/null -w '{host}:{port}=%{{http_connect}}\\n' -p -x \"$HTTPS_PROXY\" "
            f"telnet://{host}:{port} </dev/null" for host, port in
            (("claude.ai", 8443), ("claude.ai", 80), ("api.anthropic.com", 2053)))
        result = self.bw("--filter-network", script=script)
        self.assertEqual(re.findall(r"=(\d+)", result.stdout), ["403"] * 3, result.stderr)
        self.assertEqual({(r["host"], r["port"], r["reason"]) for r in self.decisions()},
                         {("claude.ai", 8443, "not-in-allowlist"), ("claude.ai", 80, "not-in-allowlist"),
                          ("api.anthropic.com", 2053, "not-in-allowlist")})

    def test_a_name_tunnel_on_any_port_must_open_with_its_client_hello(self):
        server = self.upstream()
        cases = {"alert": ALERT + client_hello("attacker.example"),
                 "ccs": b"\x14\x03\x03\x00\x01\x01" + client_hello("attacker.example"),
                 "heartbeat": b"\x18\x03\x03\x00\x03\x01\x00\x00" + client_hello("attacker.example"),
                 "nosni": built_client_hello(None), "plain": b"GET / HTTP/1.1\r\nHost: attacker.example\r\n\r\n",
                 # built: no 0xff byte, which curl's telnet:// would double
                 "other": built_client_hello(b"attacker.example"),
                 "good": built_client_hello(NAME.encode(), pieces=3)}
        for name, data in cases.items():
            self.put(name, data)
        script = "; ".join(tunnel(name, NAME, server.port) for name in cases)
        self.bw("--filter-network", *loopback(server), "--allow-domain", f"{NAME}:{server.port}",
                script=script)
        reasons = [r["reason"] for r in self.decisions()]
        self.assertEqual(reasons, ["tls-alert-first", "tls-change-cipher-spec-first",
                                   "tls-heartbeat-first", "no-sni", "not-tls", "sni-mismatch",
                                   "allowed-by-rule"])
        # on the host: only the good hello ever reached the upstream, intact (the proxy
        # connects before it sees the first bytes; the refused ones never sent any)
        self.assertTrue(wait(lambda: len(server.received) == 7))
        self.assertEqual([r for r in server.received if r], [cases["good"]])

    def test_a_raw_rule_carries_ssh_like_traffic_and_its_absence_does_not(self):
        server = self.upstream("ssh")
        self.put("hello", b"SSH-2.0-OpenSSH_9.2\r\n")
        script = "; ".join([tunnel("hello", NAME, server.port),
                            tunnel("hello", NAME, server.port, via="$ALL_PROXY")])
        banner = SSH_BANNER.hex()
        raw = self.bw("--filter-network", *loopback(server), "--allow-domain",
                      f"{NAME}:{server.port}/raw", script=script)
        self.assertEqual(raw.stdout.count(banner), 2, raw.stdout + raw.stderr)
        self.assertTrue(wait(lambda: len(server.received) == 2))
        self.assertEqual(server.received, [b"SSH-2.0-OpenSSH_9.2\r\n"] * 2)
        server.received.clear()
        self.assertEqual({r.get("tunnel") for r in self.decisions()}, {"raw"})
        os.unlink(self.log)
        plain = self.bw("--filter-network", *loopback(server), "--allow-domain",
                        f"{NAME}:{server.port}", script=script)
        self.assertNotIn(banner, plain.stdout)
        self.assertEqual([r["reason"] for r in self.decisions()], ["not-tls"] * 2)
        self.assertTrue(wait(lambda: len(server.received) == 2))
        self.assertEqual(server.received, [b""] * 2, "the upstream got bytes without a raw rule")
        self.assertIn(f"--allow-domain {NAME}:{server.port}/raw", self.summary(plain))

    def test_plain_http_through_the_http_proxy_needs_only_the_name_rule(self):
        """Absolute-form GET http://name:port/ keeps its Host check and needs no /raw rule."""
        server = self.upstream("http")
        url = f"http://{NAME}:{server.port}/"
        script = (f"curl -sS -m 8 --noproxy '' -x \"$HTTP_PROXY\" {url}; "
                  f"curl -sS -m 8 --noproxy '' -x \"$HTTP_PROXY\" -H 'Host: attacker.example' {url}")
        result = self.bw("--filter-network", *loopback(server), "--allow-domain",
                         f"{NAME}:{server.port}", script=script)
        self.assertEqual(result.stdout.count("ok"), 1, result.stdout + result.stderr)
        self.assertIn("Host header does not match", result.stdout)
        self.assertTrue(wait(lambda: len(server.received) == 1))
        self.assertIn(f"Host: {NAME}:{server.port}".encode(), server.received[0])

    def test_learn_writes_a_raw_rule_for_a_stream_that_was_not_tls(self):
        ssh, tls = self.upstream("ssh"), self.upstream()
        self.put("hello", b"SSH-2.0-OpenSSH_9.2\r\n")
        self.put("tls", built_client_hello(NAME.encode()))
        learned = os.path.join(self.root, "learned")
        result = self.bw("--learn", learned, *loopback(ssh), *loopback(tls),
                         script="; ".join([tunnel("hello", NAME, ssh.port),
                                           tunnel("tls", NAME, tls.port)]))
        self.assertIn(SSH_BANNER.hex(), result.stdout, result.stderr)
        with open(learned) as f:
            rules = [line.split()[0] for line in f if not line.startswith("#")]
        self.assertEqual(sorted(rules), sorted([f"{NAME}:{ssh.port}/raw", f"{NAME}:{tls.port}"]))

    def test_filter_network_alone_leaves_only_lo(self):
        server = self.upstream("http")
        script = ("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; "
                  f"curl -sS -m 5 --noproxy '*' http://127.0.0.1:{server.port}/; echo direct=$?")
        result = self.bw("--filter-network", "--allow-domain", "127.0.0.1:8001", script=script,
                         pinned=False)
        self.assertEqual(result.stdout.split()[0], "lo")
        hints = [line for line in result.stderr.splitlines() if "hint:" in line]
        self.assertEqual(len(hints), 1, result.stderr)
        self.assertIn("--host-port 8001", hints[0])
        self.assertNotIn("eth", result.stdout)
        self.assertIn("direct=7", result.stdout)
        self.assertNotIn("advisory", result.stderr)
        self.assertEqual(server.accepted, 0, "a direct connection reached the host's loopback")

    def test_host_port_reaches_a_host_service_bound_to_127_0_0_1(self):
        server = self.upstream("http")
        script = (f"curl -sS -m 8 --noproxy '*' http://127.0.0.1:8123/ ; "
                  f"curl -sS -m 8 --noproxy '*' http://localhost:8123/x")
        result = self.bw("--filter-network", "--host-port", f"8123:{server.port}", script=script,
                         pinned=False)
        self.assertEqual(result.stdout.count("ok"), 2, result.stderr)
        self.assertTrue(wait(lambda: len(server.received) == 2))
        self.assertTrue(all(r.startswith(b"GET /") for r in server.received), server.received)
        decided = [(r["host"], r["port"], r["decision"]) for r in self.decisions()]
        self.assertEqual(decided, [("127.0.0.1", server.port, "allow")] * 2)
        self.assertIn("2 allowed, 0 blocked", self.summary(result))

    def test_the_summary_counts_failures_and_names_the_real_fix(self):
        server = self.upstream("http")
        script = "; ".join([
            f"curl -sS -m 8 --noproxy '' -x \"$HTTPS_PROXY\" http://127.0.0.1:{server.port}/",
            f"curl -sS -m 8 -o /dev/null -p -x \"$HTTPS_PROXY\" https://{GONE}/",
            f"curl -sS -m 8 -o /dev/null -p -x \"$HTTPS_PROXY\" https://{GONE}/",
            f"curl -sS -m 8 -p -x \"$HTTPS_PROXY\" http://{LAN}:8000/ -o /dev/null -w '%{{http_code}}\\n'",
            f"curl -sS -m 8 -x \"$HTTPS_PROXY\" http://{LAN}:8000/",
            f"curl -sS -m 8 -o /dev/null -p -x \"$HTTPS_PROXY\" https://raw.githubusercontent.com/"])
        result = self.bw("--filter-network", "--allow-domain", f"127.0.0.1:{server.port}",
                         "--allow-domain", f"{GONE}:443", "--allow-domain", f"{LAN}:8000",
                         script=script)
        self.assertIn("IP rule '10.1.2.3:8000'", result.stdout)     # the in-band 403 text
        summary = result.stderr[result.stderr.index("bw-claude: network:"):]
        self.assertTrue(summary.startswith("bw-claude: network: 1 allowed, 2 blocked, 2 failed"),
                        summary)
        self.assertIn(f"{GONE}:443 x2 (DNS lookup failed)", summary)
        self.assertIn("--allow-domain 10.1.2.3:8000 (only if you mean it) or --allow-private", summary)
        self.assertNotIn(f"--allow-domain {LAN}", summary)
        self.assertIn("blocked by design, as in every session: raw.githubusercontent.com:443", summary)


def wait(predicate, seconds=10):
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class AdvisoryBridgeTest(BridgeCase):
    def other_user(self, argv):
        """Run argv as another local user: nobody when we are root, else (an unprivileged
        run, which cannot switch users) as ourselves but without the session's credential."""
        if os.geteuid() == 0 and shutil.which("setpriv"):
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd="/")

    def test_another_user_cannot_use_the_bridge(self):
        server = self.upstream("http")
        rule = f"127.0.0.1:{server.port}"
        url = f"http://{rule}/"
        script = (f'printf "%s\\n" "${{HTTPS_PROXY##*@}}" > bridge.txt; '
                  f'curl -sS -m 8 --noproxy "" {url} > mine.txt; i=0; '
                  'while [ ! -e done ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done')
        command = [sys.executable, BW_CLAUDE, "--no-defaults", "--filter-network", "--share-net",
                   "--allow-domain", rule, "--proxy-log", self.log, "--shell", "--", "-c", script]
        session = subprocess.Popen(command, cwd=self.project, env=self.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            bridge_file = os.path.join(self.project, "bridge.txt")
            self.assertTrue(wait(lambda: os.path.exists(os.path.join(self.project, "mine.txt"))
                                 and os.path.getsize(os.path.join(self.project, "mine.txt")) > 0, 30))
            with open(bridge_file) as f:
                bridge = f.read().strip()
            self.assertRegex(bridge, r"^127\.0\.0\.1:\d+$")
            before = server.accepted
            tries = {
                "http": ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                         "--noproxy", "", "-x", f"http://{bridge}", url],
                "http-guess": ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                               "--noproxy", "", "-x", f"http://bw:guess@{bridge}", url],
                "socks5": ["curl", "-sS", "-m", "5", "--noproxy", "", "-x", f"socks5h://{bridge}", url],
                "socks4a": ["curl", "-sS", "-m", "5", "--noproxy", "", "-x", f"socks4a://{bridge}", url],
            }
            seen = {name: self.other_user(argv) for name, argv in tries.items()}
        finally:
            with open(os.path.join(self.project, "done"), "w"):
                pass
            out, err = session.communicate(timeout=60)
        self.assertEqual(session.returncode, 0, err)
        with open(os.path.join(self.project, "mine.txt")) as f:
            self.assertEqual(f.read(), "ok\n", "the session's own client did not get through")
        self.assertEqual(seen["http"].stdout, "407")
        self.assertEqual(seen["http-guess"].stdout, "407")
        for name in ("socks5", "socks4a"):
            self.assertNotEqual(seen[name].returncode, 0, seen[name])
            self.assertNotIn("ok", seen[name].stdout)
        # on the host: the other user's requests never reached the service
        self.assertEqual(server.accepted, before)
        reasons = [r["reason"] for r in self.decisions()]
        self.assertEqual(reasons.count("proxy-auth"), 4, reasons)
        self.assertIn("advisory", err)
        summary = [line for line in err.splitlines() if "network:" in line][-1]
        self.assertIn("1 allowed, 0 blocked", summary)
        self.assertIn("4 connections without this session's proxy credential refused", summary)

    def test_dry_run_shows_no_token(self):
        """Each run has a fresh random token: two dry runs printing the same shows none."""
        runs = [subprocess.run([sys.executable, BW_CLAUDE, "--no-defaults", "--filter-network",
                                "--share-net", "--shell", "--dry-run"], cwd=self.project,
                               env=self.env, capture_output=True, text=True, timeout=30)
                for _ in range(2)]
        self.assertEqual(runs[0].returncode, 0, runs[0].stderr)
        self.assertIn("--token-env BW_PROXY_TOKEN", runs[0].stdout)
        self.assertIn("BW_PROXY_TOKEN=<hidden>", runs[0].stdout)
        self.assertEqual(runs[0].stdout, runs[1].stdout)


class QuietLineTest(RealCLITest):
    def test_gemini_telemetry_is_on_the_quiet_line(self):
        self.need_cli("gemini")
        self.seed_gemini_settings()
        code, out, err = self.run_wrapper(self.wrapper("gemini", "--", "--skip-trust", "-p", "say hi"))
        self.assertEqual(code, 0, f"stdout: {out}\nstderr: {err}")
        blocked = {(r["host"], r["port"]) for r in read_decisions(self.proxy_log)
                   if r["decision"] == "deny"}
        self.assertIn(("play.googleapis.com", 443), blocked)
        expected = bw_lib.PROFILES["gemini"].expected_blocked
        self.assertLessEqual({f"{h}:{p}" for h, p in blocked}, set(expected), blocked)
        summary = self.summary_line(err, "bw-gemini")
        self.assertRegex(summary, r"^bw-gemini: network: \d+ allowed, 0 blocked: blocked by design, "
                                  r"as in every session: play\.googleapis\.com:443")

    def test_claude_lookups_that_fail_are_counted_apart(self):
        """Claude Code 2.1.x also CONNECTs api.anthropic.com:443 when its base URL is the fake:
        allowed, and (no DNS here: resolv.conf names 127.0.0.1, where nothing answers) failed.
        The summary must not count those as allowed (issue 12: "7 allowed" with 6 failed)."""
        self.need_cli("claude")
        for name, text in (("hosts", "127.0.0.1 localhost\n"), ("resolv.conf", RESOLV)):
            with open(os.path.join(self.tmp, name), "w") as f:
                f.write(text)
        pinned = ["unshare", "-rm", "sh", "-c", PINNED, "sh", os.path.join(self.tmp, "hosts"),
                  os.path.join(self.tmp, "resolv.conf")]
        if subprocess.run(pinned + ["true"], capture_output=True, timeout=20).returncode != 0:
            missing("needs `unshare -rm` and `mount` for a private /etc/resolv.conf")
        code, out, err = self.run_wrapper(pinned + self.wrapper("claude", "--", "-p", "say hi"))
        self.assertEqual(code, 0, f"stdout: {out}\nstderr: {err}")
        self.assertIn(self.answer, out)
        records = read_decisions(self.proxy_log)
        self.assertEqual([r for r in records if r["decision"] == "deny"], [])
        fake = [r for r in records if r["host"] == self.fake.host]
        summary = self.summary_line(err, "bw-claude")
        match = re.match(r"^bw-claude: network: (\d+) allowed, 0 blocked(?:, (\d+) failed: failed: "
                         r"api\.anthropic\.com:443(?: x\d+)? \(DNS lookup failed\))?$", summary)
        self.assertTrue(match, summary)
        self.assertEqual(int(match.group(1)), len(fake), summary)
        self.assertEqual(int(match.group(1)) + int(match.group(2) or 0), len(records), summary)


def read_decisions(path):
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["event"] == "decision"]


if __name__ == "__main__":
    unittest.main()
