"""The network story told at the end of a session, specified once: counts, each blocked
destination with its reason and the option that would allow it, failures counted apart,
hosts blocked by design on one quiet line, a table on a wide terminal; and the --learn file.
First the pure functions on log records, then real sessions (real bwrap, socat, curl and
socks_filter.py, upstreams on the host's loopback), then the real CLIs."""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import tempfile
import termios
import unittest

import bw_lib
import socks_filter
from tests.sandbox_harness import (BODY, GONE, LAN, NAME, SSH_BANNER, PinnedCase, SessionCase,
                                   LoopbackUpstreams, decisions, fetch, loopback, pinned_names,
                                   read_log, read_pty, tunnel)
from tests.proxy_harness import built_client_hello
from tests.test_real_cli import RealCLITest


# -- log records ------------------------------------------------------------------------------

def record(event="decision", decision="allow", reason="allowed-by-rule", **fields):
    return {"event": event, "decision": decision, "reason": reason, **fields}


def denied(host, port, reason="not-in-allowlist", proto="http-connect", id=1, **extra):
    return record(decision="deny", reason=reason, id=id, proto=proto, host=host, port=port,
                  **{"mode": "enforce", **extra})


def audited(host, port, proto="http-connect", id=1, reason="not-in-allowlist"):
    return denied(host, port, reason, proto, id, mode="audit", enforced=False)


def closed(host, port, id, reason="closed", address=None):
    return record("close", reason=reason, id=id, host=host, port=port, address=address)


def log_lines(*records):
    """The records as the proxy log's lines, which summarize() reads."""
    return [json.dumps(r) for r in records]


# -- the summary, pure ------------------------------------------------------------------------

class SummaryTest(unittest.TestCase):
    def test_counts_groups_and_options(self):
        deny = {"event": "decision", "decision": "deny", "mode": "enforce"}
        lines = log_lines(
            {"event": "decision", "decision": "allow", "host": "api.anthropic.com", "port": 443},
            {"event": "close", "decision": "allow", "host": "api.anthropic.com", "port": 443},
            {**deny, "host": "sentry.io", "port": 443, "reason": "not-in-allowlist"},
            {**deny, "host": "sentry.io", "port": 443, "reason": "not-in-allowlist"},
            {**deny, "host": "2606:4700::1111", "port": 443, "reason": "ip-literal-not-allowed"},
            {**deny, "host": "169.254.169.254", "port": 80, "reason": "ip-literal-not-allowed"},
            {**deny, "host": "127.0.0.1", "port": 22, "reason": "private-address"},
            {**deny, "host": "10.1.2.3", "port": 80, "reason": "private-address"},
            {**deny, "host": "intranet.example", "port": 80, "reason": "private-address"},
            {"event": "decision", "decision": "deny", "enforced": False, "host": "a.example",
             "port": 443, "reason": "not-in-allowlist"})
        text = bw_lib.summarize("bw-claude", lines + ["not json", "[1]"])
        self.assertNotIn("\n", text)
        self.assertTrue(text.startswith("bw-claude: network: 2 allowed, 7 blocked: "))
        self.assertIn("sentry.io:443 x2 (not in allow list) --allow-domain sentry.io:443", text)
        self.assertIn("--allow-domain '[2606:4700::1111]:443'", text)
        # A private address is flagged: the metadata service, this machine's ssh...
        self.assertIn("10.1.2.3:80 (private address: allow only if you mean it) "
                      "--allow-domain 10.1.2.3:80", text)
        self.assertIn("169.254.169.254:80 (IP address without an IP rule: allow only if you "
                      "mean it) --allow-domain 169.254.169.254:80", text)
        self.assertIn("127.0.0.1:22 (private address: allow only if you mean it) "
                      "--allow-domain 127.0.0.1:22", text)
        self.assertIn("intranet.example:80 (private address);", text + ";")
        self.assertNotIn("--allow-domain intranet.example", text)
        self.assertNotIn("a.example", text)

    def test_nothing_happened(self):
        self.assertEqual(bw_lib.summarize("bw-gemini", []), "bw-gemini: network: 0 allowed, 0 blocked")

    def test_hostile_names_cannot_reach_the_terminal(self):
        lines = log_lines({"event": "decision", "decision": "deny", "host": "x\x1b[2Jy\n",
                           "port": 443, "reason": "bad-name"})
        text = bw_lib.summarize("bw-claude", lines)
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\n", text)
        self.assertIn("x?[2Jy?:443 (malformed name)", text)

    def test_long_lists_are_cut(self):
        lines = log_lines(*[{"event": "decision", "decision": "deny", "host": f"h{i}.example",
                             "port": 443, "reason": "not-in-allowlist"} for i in range(15)])
        text = bw_lib.summarize("bw-claude", lines)
        self.assertIn("and 5 more (see --proxy-log)", text)
        self.assertEqual(text.count("--allow-domain"), bw_lib.SUMMARY_HOSTS)

    def test_failed_connections_are_counted_apart_with_their_reason(self):
        lines = [record(id=1, host="api.anthropic.com", port=443)]
        for i in range(2, 8):
            lines += [record(id=i, host="api.anthropic.com", port=443),
                      record("close", reason="lookup-failed", id=i, host="api.anthropic.com", port=443)]
        lines += [record(id=9, host="a.example", port=443),
                  record("close", reason="connect-refused", id=9, host="a.example", port=443)]
        text = bw_lib.summarize("bw-claude", log_lines(*lines))
        self.assertTrue(text.startswith("bw-claude: network: 1 allowed, 0 blocked, 7 failed"), text)
        self.assertIn("api.anthropic.com:443 x6 (DNS lookup failed)", text)
        self.assertIn("a.example:443 (connection refused)", text)

    def test_a_private_name_gets_the_real_fix(self):
        lines = [record(decision="deny", reason="private-address", id=1, host="learn.bars.test",
                        port=8000, address="10.0.0.5:8000")]
        text = bw_lib.summarize("bw-claude", log_lines(*lines))
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
        text = bw_lib.summarize("bw-claude", log_lines(*lines))
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
        text = bw_lib.summarize("bw-gemini", log_lines(*lines), width=200, expected=expected)
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
        one_line = bw_lib.summarize("bw-claude", log_lines(*lines))
        for width in (30, 50, 79):
            with self.subTest(width=width):
                text = bw_lib.summarize("bw-claude", log_lines(*lines), width=width)
                self.assertEqual(" ".join(line.strip() for line in text.splitlines()), one_line)
                words = set(one_line.split())
                self.assertTrue(all(word in words for line in text.splitlines() for word in line.split()))
                self.assertTrue(all(len(line) <= width or " " not in line.strip()
                                    for line in text.splitlines()), text)

    def test_tunnel_refusals_suggest_a_raw_rule_only_when_it_could_be_meant(self):
        lines = [record(decision="deny", reason="not-tls", id=1, host="github.com", port=22),
                 record(decision="deny", reason="tls-alert-first", id=2, host="claude.ai", port=443)]
        text = bw_lib.summarize("bw-claude", log_lines(*lines))
        self.assertIn("--allow-domain github.com:22/raw", text)
        self.assertIn("claude.ai:443 (TLS alert before the ClientHello);", text + ";")


class StoryTest(unittest.TestCase):
    RECORDS = [
        {"event": "decision", "id": 1, "decision": "allow", "host": "api.anthropic.com",
         "port": 443, "reason": "allowed-by-rule"},
        denied("sentry.io", 443, id=2), denied("sentry.io", 443, id=3),
        denied("10.1.2.3", 80, "private-address", id=4),
        denied("intranet.example", 443, "private-address", id=5),
        denied("2606:4700::1111", 443, "ip-literal-not-allowed", id=6),
        denied("evil.example", 443, "sni-mismatch", id=7),
        audited("learned.example", 443, id=8),
    ]

    def test_each_blocked_destination_once_with_count_reason_and_option(self):
        allowed, blocked = bw_lib.network_story(self.RECORDS)
        self.assertEqual(allowed, 2)
        rows = {bw_lib.host_port(b.host, b.port): (b.count, b.why, b.option) for b in blocked}
        self.assertEqual(rows, {
            "sentry.io:443": (2, "not in allow list", "--allow-domain sentry.io:443"),
            "10.1.2.3:80": (1, "private address: allow only if you mean it",
                            "--allow-domain 10.1.2.3:80"),
            "intranet.example:443": (1, "private address", ""),
            "[2606:4700::1111]:443": (1, "IP address without an IP rule",
                                      "--allow-domain '[2606:4700::1111]:443'"),
            "evil.example:443": (1, "TLS name differs from the requested host", ""),
        })
        self.assertEqual(blocked[0].host, "sentry.io")

    def test_a_table_when_the_terminal_is_wide_enough(self):
        story = bw_lib.network_story(self.RECORDS)
        table = bw_lib.format_story("bw-claude", *story, width=120)
        lines = table.splitlines()
        self.assertEqual(lines[0], "bw-claude: network: 2 allowed, 6 blocked:")
        self.assertEqual(lines[1].split(), ["blocked", "times", "why", "to", "allow", "it"])
        self.assertEqual(len(lines), 2 + 5)
        self.assertEqual(len({line.index("to allow it") if i == 1 else len(line.split("  ")[0])
                              for i, line in enumerate(lines[1:], 1)}), 2)
        sentry = next(line for line in lines if "sentry.io" in line)
        self.assertEqual(sentry.split(), ["sentry.io:443", "2", "not", "in", "allow", "list",
                                          "--allow-domain", "sentry.io:443"])
        why = lines[1].index("why")
        self.assertTrue(all(line[why - 2:why] == "  " for line in lines[1:]))
        text = bw_lib.format_story("bw-claude", *story, width=None)
        self.assertNotIn("\n", text)
        self.assertIn("sentry.io:443 x2 (not in allow list) --allow-domain sentry.io:443;", text)
        # Narrower than the table: folded between words, no word cut in half.
        folded = bw_lib.format_story("bw-claude", *story, width=40)
        self.assertEqual(" ".join(line.strip() for line in folded.splitlines()), text)
        self.assertTrue(all(len(line) <= 40 or " " not in line.strip()
                            for line in folded.splitlines()), folded)

    def test_nothing_blocked_is_one_line_even_on_a_terminal(self):
        self.assertEqual(bw_lib.format_story("bw-claude", 3, [], width=200),
                         "bw-claude: network: 3 allowed, 0 blocked")


# -- the learn file, pure -------------------------------------------------------------------


class LearnedTest(unittest.TestCase):
    def test_the_file_allows_exactly_what_was_reached(self):
        records = [
            audited("b.example", 443, id=1), closed("b.example", 443, 1, address="93.184.216.34:443"),
            audited("b.example", 443, "socks5", id=2), closed("b.example", 443, 2,
                                                             "proxy-stopped", "93.184.216.34:443"),
            {"event": "decision", "id": 3, "decision": "allow", "proto": "http-connect",
             "host": "api.anthropic.com", "port": 443, "reason": "allowed-by-rule"},
            closed("api.anthropic.com", 443, 3, address="160.79.104.10:443"),
            audited("2001:db8::5", 8443, id=4, reason="ip-literal-not-allowed"),
            closed("2001:db8::5", 8443, 4, address="[2001:db8::5]:8443"),
            audited("gone.example", 443, id=5), closed("gone.example", 443, 5, "lookup-failed"),
            audited("spoof.example", 443, id=6), closed("spoof.example", 443, 6, "sni-mismatch"),
            denied("spoof.example", 443, "sni-mismatch", id=6),
            audited("localhost", 8080, "http", id=7), closed("localhost", 8080, 7,
                                                             address="127.0.0.1:8080"),
            audited("dev.example", 80, "http", id=8), closed("dev.example", 80, 8,
                                                             address="192.168.1.5:80"),
            denied("denied.example", 443, "private-address", id=9),
        ]
        text, count = bw_lib.format_learned("bw-claude", bw_lib.learned(records), "today")
        with tempfile.NamedTemporaryFile("w") as f:
            f.write(text)
            f.flush()
            rules = [r.text for r in socks_filter.read_rule_file(f.name)]
        self.assertEqual(rules, ["[2001:db8::5]:8443", "api.anthropic.com:443", "b.example:443",
                                 "dev.example:80"])
        self.assertEqual(count, 4)
        self.assertIn("b.example:443          # 2 connections: http-connect, socks5\n", text)
        self.assertIn("# not reached, so not allowed: gone.example:443 (1 connection: "
                      "http-connect; failed: lookup-failed)", text)
        self.assertIn("# not reached, so not allowed: spoof.example:443", text)
        self.assertIn("# cannot be a rule: localhost:8080", text)
        self.assertIn("reached private 192.168.1.5: needs --allow-private too", text)
        self.assertNotIn("denied.example", text)
        self.assertTrue(text.startswith("# bw-claude --learn, today"))

    def test_a_session_that_went_nowhere(self):
        text, count = bw_lib.format_learned("bw-gemini", {}, "today")
        self.assertEqual(count, 0)
        self.assertTrue(all(line.startswith("#") for line in text.splitlines()))


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


# -- real sessions ----------------------------------------------------------------------------

class StorySessionTest(LoopbackUpstreams, SessionCase):
    PREFIX = "bw-story-"
    TOOLS = ("socat", "curl")

    def test_learn_then_lock_down(self):
        # Loopback stays closed in learn mode, --allow-private or not (that opens only the
        # private-use networks), so this session reaches it by an IP rule, which is learned
        # like any destination reached.  An IP rule is how a loopback address is allowed.
        learned = os.path.join(self.root, "learned.allow")
        result = self.check(self.bw("--learn", learned, "--allow-domain", self.one, script="; ".join([
            fetch(self.one), fetch(self.one, '-x "$ALL_PROXY"')])))
        self.assertEqual(result.stdout.count(BODY.decode()), 2)
        self.assertIn("bw-claude: learn mode: the network is OPEN", result.stderr)
        self.assertIn(f"bw-claude: learn: wrote 1 destination to {learned}", result.stderr)
        self.assertEqual([r.text for r in socks_filter.read_rule_file(learned)], [self.one])
        with open(learned) as f:
            self.assertIn(f"{self.one}  # 2 connections: http, socks5\n", f.read())
        self.assert_clean()

        other_port = "127.0.0.2:%d" % self.servers[1].server_address[1]
        result = self.check(self.bw("--filter-network", "--unshare-net", "--allow-file", learned,
                                    script="; ".join([
                                        fetch(self.one, label="one"),
                                        fetch(self.two, label="two"),
                                        fetch(other_port, label="port"),
                                        fetch("example.com", label="name")])))
        self.assertEqual(result.stdout.count(BODY.decode()), 1)
        for line in ("one=200", "two=403", "port=403", "name=403"):
            self.assertIn(line, result.stdout.split())
        self.assertIn("network: 1 allowed, 3 blocked", result.stderr)
        self.assertNotIn("learn", result.stderr)
        self.assert_clean()

    def test_learn_keeps_private_addresses_closed(self):
        learned = os.path.join(self.root, "learned.allow")
        result = self.check(self.bw("--learn", learned, script=fetch(self.one)))
        self.assertNotIn(BODY.decode(), result.stdout)
        self.assertIn("code=403", result.stdout)
        self.assertIn("private addresses stay blocked", result.stderr)
        self.assertIn(f"{self.one} (private address: allow only if you mean it) "
                      f"--allow-domain {self.one}", result.stderr)
        self.assertIn("wrote 0 destinations", result.stderr)
        self.assertEqual(socks_filter.read_rule_file(learned), [])
        self.assert_clean()

    def blocked_session(self, **kwargs):
        log = os.path.join(self.root, "proxy.jsonl")
        script = "; ".join([fetch(self.one), fetch("blocked.example"),
                            fetch("blocked.example", '-x "$ALL_PROXY"'), fetch(self.two)])
        return log, self.bw("--filter-network", "--unshare-net", "--allow-domain", self.one,
                            "--proxy-log", log, script=script, **kwargs)

    def test_summary_names_blocked_hosts_and_the_log_rebuilds_it(self):
        log, result = self.blocked_session()
        self.check(result)
        summary = result.stderr.strip().splitlines()[-1]
        self.assertTrue(summary.startswith("bw-claude: network: 1 allowed, 3 blocked: "), summary)
        self.assertIn("blocked.example:80 x2 (not in allow list) --allow-domain blocked.example:80",
                      summary)
        self.assertIn(f"{self.two} (private address: allow only if you mean it) "
                      f"--allow-domain {self.two}", summary)
        with open(log) as f:
            self.assertEqual(bw_lib.summarize("bw-claude", f), summary)
        self.assert_clean()

    def test_summary_is_a_table_on_a_wide_terminal(self):
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        try:
            log, result = self.blocked_session(stderr=slave, stdout=subprocess.PIPE,
                                               capture_output=False)
        finally:
            os.close(slave)
        self.check(result)
        seen = read_pty(master)
        lines = seen.decode().replace("\r\n", "\n").splitlines()
        head = lines.index("bw-claude: network: 1 allowed, 3 blocked:")
        self.assertEqual(lines[head + 1].split()[:3], ["blocked", "times", "why"])
        row = next(line for line in lines[head:] if "blocked.example:80" in line)
        self.assertEqual(row.split()[-2:], ["--allow-domain", "blocked.example:80"])
        with open(log) as f:
            self.assertEqual(bw_lib.summarize("bw-claude", f, width=160),
                             "\n".join(lines[head:head + 4]))
        self.assert_clean()


class PinnedStoryTest(PinnedCase):
    """Failures and raw tunnels in the story, with names pinned to loopback."""

    def test_the_summary_counts_failures_and_names_the_real_fix(self):
        server = self.upstream("http")
        script = "; ".join([
            f"curl -sS -m 8 --noproxy '' -x \"$HTTPS_PROXY\" http://127.0.0.1:{server.port}/",
            f"curl -sS -m 8 -o /dev/null -p -x \"$HTTPS_PROXY\" https://{GONE}/",
            f"curl -sS -m 8 -o /dev/null -p -x \"$HTTPS_PROXY\" https://{GONE}/",
            f"curl -sS -m 8 -p -x \"$HTTPS_PROXY\" http://{LAN}:8000/ -o /dev/null -w '%{{http_code}}\\n'",
            f"curl -sS -m 8 -x \"$HTTPS_PROXY\" http://{LAN}:8000/",
            "curl -sS -m 8 -o /dev/null -p -x \"$HTTPS_PROXY\" https://raw.githubusercontent.com/"])
        result = self.filtered("--filter-network", "--allow-domain", f"127.0.0.1:{server.port}",
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

    def test_learn_writes_a_raw_rule_for_a_stream_that_was_not_tls(self):
        ssh, tls = self.upstream("ssh"), self.upstream()
        self.put("hello", b"SSH-2.0-OpenSSH_9.2\r\n")
        self.put("tls", built_client_hello(NAME.encode()))
        learned = os.path.join(self.root, "learned")
        result = self.filtered("--learn", learned, *loopback(ssh), *loopback(tls),
                         script="; ".join([tunnel("hello", NAME, ssh.port),
                                           tunnel("tls", NAME, tls.port)]))
        self.assertIn(SSH_BANNER.hex(), result.stdout, result.stderr)
        with open(learned) as f:
            rules = [line.split()[0] for line in f if not line.startswith("#")]
        self.assertEqual(sorted(rules), sorted([f"{NAME}:{ssh.port}/raw", f"{NAME}:{tls.port}"]))


class QuietLineTest(RealCLITest):
    def test_gemini_telemetry_is_on_the_quiet_line(self):
        self.need_cli("gemini")
        self.seed_gemini_settings()
        code, out, err = self.run_wrapper(self.wrapper("gemini", "--", "--skip-trust", "-p", "say hi"))
        self.assertEqual(code, 0, f"stdout: {out}\nstderr: {err}")
        blocked = {(r["host"], r["port"]) for r in decisions(read_log(self.proxy_log))
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
        The summary must not count those as allowed ("7 allowed" with 6 of them failed)."""
        self.need_cli("claude")
        pinned = pinned_names(self.root, hosts="127.0.0.1 localhost\n")
        code, out, err = self.run_wrapper(pinned + self.wrapper("claude", "--", "-p", "say hi"))
        self.assertEqual(code, 0, f"stdout: {out}\nstderr: {err}")
        self.assertIn(self.answer, out)
        records = decisions(read_log(self.proxy_log))
        self.assertEqual([r for r in records if r["decision"] == "deny"], [])
        fake = [r for r in records if r["host"] == self.fake.host]
        summary = self.summary_line(err, "bw-claude")
        match = re.match(r"^bw-claude: network: (\d+) allowed, 0 blocked(?:, (\d+) failed: failed: "
                         r"api\.anthropic\.com:443(?: x\d+)? \(DNS lookup failed\))?$", summary)
        self.assertTrue(match, summary)
        self.assertEqual(int(match.group(1)), len(fake), summary)
        self.assertEqual(int(match.group(1)) + int(match.group(2) or 0), len(records), summary)


if __name__ == "__main__":
    unittest.main()
