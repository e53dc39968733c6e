"""Daily use (issue 7): --learn, --allow-preset, the defaults file, --doctor and the story told
when something is blocked.  First the pure functions, then real sessions: real bwrap, socat,
curl and socks_filter.py, a fake CLI, and upstreams on 127.0.0.2 and 127.0.0.3 only (loopback
addresses, which the proxy treats as private: see the learn tests for what that means)."""

import contextlib
import fcntl
import http.server
import io
import os
import pty
import select
import shutil
import struct
import subprocess
import tempfile
import termios
import threading
import unittest

import bw_lib
import socks_filter
from bw_lib import PROFILES, Failure
from tests.test_sandbox import (BODY, FAKE_CLI, SessionCase, Upstream, make_session_dirs,
                                one_line, require_sandbox)

CLAUDE = PROFILES["claude"]

# A fake CLI that also answers --version, as --doctor asks.
VERSIONED_CLI = FAKE_CLI.replace("#!/bin/sh\n", '#!/bin/sh\n[ "$1" = --version ] && '
                                 'echo "9.9.9 (Fake Code)" && exit 0\n', 1)


def decision(host, port, reason="not-in-allowlist", proto="http-connect", id=1, **extra):
    return {"event": "decision", "id": id, "proto": proto, "host": host, "port": port,
            "decision": "deny", "reason": reason, "mode": "enforce", **extra}


def audited(host, port, proto="http-connect", id=1, reason="not-in-allowlist"):
    return decision(host, port, reason, proto, id, mode="audit", enforced=False)


def closed(host, port, id, reason="closed", address=None):
    return {"event": "close", "id": id, "host": host, "port": port, "decision": "allow",
            "reason": reason, "address": address}


# -- pure functions -------------------------------------------------------------------------

class PresetTest(unittest.TestCase):
    def test_every_rule_parses_and_the_policy_lets_its_host_through(self):
        for name, (description, rules) in bw_lib.PRESETS.items():
            self.assertTrue(description and rules, name)
            policy = socks_filter.Policy(allow=[socks_filter.parse_rule(r) for r in rules])
            for rule in rules:
                with self.subTest(preset=name, rule=rule):
                    host, _, port = rule.rpartition(":")
                    self.assertNotIn("*", host, "presets name hosts, never wildcards")
                    self.assertTrue(policy.check_request(host, int(port)).allowed)
                    self.assertFalse(policy.check_request(host, 22).allowed)

    def test_the_required_presets_exist(self):
        for name in ("github", "npm", "pypi", "crates", "go", "rubygems", "maven", "debian",
                     "ubuntu"):
            self.assertIn(name, bw_lib.PRESETS)
        github = bw_lib.PRESETS["github"][1]
        for host in ("github.com", "api.github.com", "codeload.github.com",
                     "raw.githubusercontent.com", "objects.githubusercontent.com"):
            self.assertIn(f"{host}:443", github)

    def test_list_presets_is_an_allow_file(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(bw_lib.Finished) as finished:
            bw_lib.plan_session(CLAUDE, ["--list-presets"], {"HOME": "/nonexistent"})
        self.assertEqual(finished.exception.code, 0)
        with tempfile.NamedTemporaryFile("w", suffix=".allow") as f:
            f.write(out.getvalue())
            f.flush()
            rules = socks_filter.read_rule_file(f.name)
        everything = [r for _, rules in bw_lib.PRESETS.values() for r in rules]
        self.assertEqual([r.text for r in rules], everything)
        self.assertIn("# github: ", out.getvalue())

    def test_presets_join_the_allow_list_once(self):
        opts = bw_lib.parse_args(CLAUDE, ["--filter-network", "--allow-preset", "pypi",
                                          "--allow-preset", "npm", "--allow-preset", "pypi"])
        self.assertEqual(bw_lib.preset_rules(opts.allow_preset),
                         [*bw_lib.PRESETS["pypi"][1], *bw_lib.PRESETS["npm"][1]])
        with self.assertRaises(Failure) as caught:
            bw_lib.parse_args(CLAUDE, ["--filter-network", "--allow-preset", "githib"])
        self.assertIn("github", str(caught.exception))


class OptionsTest(unittest.TestCase):
    def parse(self, *argv, defaults=()):
        return bw_lib.parse_args(CLAUDE, list(argv), list(defaults))

    def test_the_last_switch_wins_and_the_command_line_comes_last(self):
        defaults = ["--filter-network", "--unshare-net", "--full-home-access", "-v"]
        opts = self.parse(defaults=defaults)
        self.assertEqual((opts.filter_network, opts.unshare_net, opts.full_home_access,
                          opts.verbose), (True, True, True, True))
        opts = self.parse("--no-filter-network", "--share-net", "--no-full-home-access",
                          "--no-verbose", defaults=defaults)
        self.assertEqual((opts.filter_network, opts.unshare_net, opts.full_home_access,
                          opts.verbose), (False, False, False, False))
        self.assertTrue(self.parse("--no-skip-permissions").no_skip_permissions)
        self.assertFalse(self.parse("--skip-permissions",
                                    defaults=["--no-skip-permissions"]).no_skip_permissions)
        self.assertFalse(self.parse("--no-allow-config-writes",
                                    defaults=["--allow-config-writes"]).allow_config_writes)

    def test_no_network_is_unshare_without_filter(self):
        opts = self.parse("--no-network")
        self.assertEqual((opts.filter_network, opts.unshare_net), (False, True))
        opts = self.parse("--filter-network", defaults=["--no-network"])
        self.assertEqual((opts.filter_network, opts.unshare_net), (True, True))

    def test_learn_implies_filter_and_unshare_unless_told_otherwise(self):
        opts = self.parse("--learn", "out")
        self.assertEqual((opts.filter_network, opts.unshare_net), (True, True))
        self.assertFalse(self.parse("--learn", "out", "--share-net").unshare_net)
        with self.assertRaises(Failure) as caught:
            self.parse("--learn", "out", "--no-filter-network")
        self.assertIn("contradict", str(caught.exception))

    def test_filter_options_from_the_defaults_file_are_ignored_without_the_filter(self):
        defaults = ["--filter-network", "--allow-domain", "x.example", "--allow-preset", "npm"]
        opts = self.parse("--no-filter-network", defaults=defaults)
        self.assertFalse(opts.filter_network)
        with self.assertRaises(Failure) as caught:
            self.parse("--allow-preset", "npm")
        self.assertEqual(caught.exception.code, 2)
        self.assertIn("--allow-preset needs --filter-network", str(caught.exception))

    def test_defaults_file_lines(self):
        text = ("# defaults\n\n--filter-network --unshare-net   # always\n"
                "--allow-file ~/rules 'x'\n--allow-file=~/more\n")
        with self.assertRaises(Failure):   # 'x' is not an option of ours
            bw_lib.parse_defaults(CLAUDE, text, "opts", "/home/u")
        tokens = bw_lib.parse_defaults(CLAUDE, text.replace(" 'x'", ""), "opts", "/home/u")
        self.assertEqual(tokens, ["--filter-network", "--unshare-net", "--allow-file",
                                  "/home/u/rules", "--allow-file=/home/u/more"])

    def test_defaults_file_errors_name_the_line(self):
        for text, needle in (("--filter-network\n--filter-netwrok\n", "opts:2: --filter-netwrok"),
                             ("--dir\n", "opts:1: argument --dir"),
                             ("--env 'A=b\n", "opts:1: No closing quotation"),
                             ("--doctor\n", "opts:1: --doctor does not belong"),
                             ("--learn=x\n", "opts:1: --learn does not belong"),
                             ("-- --model opus\n", "opts:1: -- does not belong")):
            with self.subTest(text=text), self.assertRaises(Failure) as caught:
                bw_lib.parse_defaults(CLAUDE, text, "opts", "/home/u")
            self.assertEqual(caught.exception.code, 2)
            self.assertIn(needle, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_help_groups_have_an_example_each(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit):
            self.parse("--help")
        text = out.getvalue()
        flat = " ".join(text.split())
        for group in ("sandbox:", "network:", "diagnostics:"):
            following = text.split("\n" + group + "\n", 1)[1].splitlines()[0]
            self.assertIn("e.g. bw-claude --", following, group)
        for needle in ("--learn FILE", "--allow-preset NAME", "--doctor", "--list-presets",
                       "(undo: --share-net)", "(undo: --no-filter-network)", "DANGEROUS",
                       ".config/bw-claude/options"):
            self.assertIn(needle, flat)


class StoryTest(unittest.TestCase):
    RECORDS = [
        {"event": "decision", "id": 1, "decision": "allow", "host": "api.anthropic.com",
         "port": 443, "reason": "allowed-by-rule"},
        decision("sentry.io", 443, id=2), decision("sentry.io", 443, id=3),
        decision("10.1.2.3", 80, "private-address", id=4),
        decision("intranet.example", 443, "private-address", id=5),
        decision("2606:4700::1111", 443, "ip-literal-not-allowed", id=6),
        decision("evil.example", 443, "sni-mismatch", id=7),
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
        # Narrower than the table: folded between words, no word cut in half (issue 12).
        folded = bw_lib.format_story("bw-claude", *story, width=40)
        self.assertEqual(" ".join(line.strip() for line in folded.splitlines()), text)
        self.assertTrue(all(len(line) <= 40 or " " not in line.strip()
                            for line in folded.splitlines()), folded)

    def test_nothing_blocked_is_one_line_even_on_a_terminal(self):
        self.assertEqual(bw_lib.format_story("bw-claude", 3, [], width=200),
                         "bw-claude: network: 3 allowed, 0 blocked")


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
            decision("spoof.example", 443, "sni-mismatch", id=6),
            audited("localhost", 8080, "http", id=7), closed("localhost", 8080, 7,
                                                             address="127.0.0.1:8080"),
            audited("dev.example", 80, "http", id=8), closed("dev.example", 80, 8,
                                                             address="192.168.1.5:80"),
            decision("denied.example", 443, "private-address", id=9),
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


class DoctorUnitTest(unittest.TestCase):
    def test_user_namespace_fixes(self):
        apparmor = bw_lib.userns_fix({"kernel.apparmor_restrict_unprivileged_userns": "1",
                                      "kernel.unprivileged_userns_clone": "1"})
        self.assertIn("/etc/apparmor.d/bwrap", apparmor)
        self.assertIn("userns,", apparmor)
        self.assertIn("kernel.apparmor_restrict_unprivileged_userns=0", apparmor)
        self.assertIn("kernel.unprivileged_userns_clone=1",
                      bw_lib.userns_fix({"kernel.unprivileged_userns_clone": "0"}))
        self.assertIn("user.max_user_namespaces",
                      bw_lib.userns_fix({"user.max_user_namespaces": "0"}))
        self.assertIn("container", bw_lib.userns_fix({}))

    def test_tiocsti_is_never_a_failure(self):
        for value, status in (("0", "ok"), ("1", "note"), (None, "note")):
            self.assertEqual(bw_lib.tiocsti_check(value).status, status)
        self.assertIn("legacy_tiocsti=0", bw_lib.tiocsti_check("1").fix)

    def test_rule_errors_name_file_and_line(self):
        with tempfile.TemporaryDirectory() as root:
            path = os.path.join(root, "allowed")
            with open(path, "w") as f:
                f.write("# c\nok.example:443\n*.github.io\nx y\n\n")
            count, errors = bw_lib.rule_problems(["a.example", "*"], [path])
        self.assertEqual(count, 1)
        self.assertEqual(len(errors), 2, errors)
        self.assertTrue(errors[0].startswith("--allow-domain *: "), errors)
        self.assertTrue(errors[1].startswith(f"{path}:3: "), errors)

    def test_report(self):
        checks = [bw_lib.Check("bwrap", "ok", "bubblewrap 0.9.0"),
                  bw_lib.Check("socat", "FAIL", "not found", "sudo apt-get install socat")]
        text = bw_lib.format_doctor("bw-claude", checks)
        self.assertIn("  ok    bwrap  bubblewrap 0.9.0", text)
        self.assertIn("  FAIL  socat  not found\n               fix: sudo apt-get install socat", text)
        self.assertTrue(text.endswith("bw-claude: 1 problem: --filter-network --unshare-net "
                                      "will not work until it is fixed"))


# -- real sessions --------------------------------------------------------------------------

class DailyUseTest(SessionCase, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_sandbox("socat", "curl")
        cls.servers = []
        for address in ("127.0.0.2", "127.0.0.3"):
            server = http.server.ThreadingHTTPServer((address, 0), Upstream)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            cls.servers.append(server)
        cls.one = "127.0.0.2:%d" % cls.servers[0].server_address[1]
        cls.two = "127.0.0.3:%d" % cls.servers[1].server_address[1]

    @classmethod
    def tearDownClass(cls):
        for server in cls.servers:
            server.shutdown()
            server.server_close()

    def setUp(self):
        make_session_dirs(self, "bw-daily-")
        self.cli = os.path.join(self.bin, "claude")
        with open(self.cli, "w") as f:
            f.write(VERSIONED_CLI)
        os.chmod(self.cli, 0o755)
        self.env = {"HOME": self.home, "PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8",
                    "XDG_RUNTIME_DIR": self.runtime}

    def write_config(self, name, text):
        path = os.path.join(self.home, ".config", "bw-claude", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return path

    @staticmethod
    def fetch(hostport, how="", label="code"):
        """A curl through the proxy variables (how="-x $ALL_PROXY" for SOCKS) printing
        the body, then LABEL=HTTP status."""
        return (f"curl -sS --noproxy '' --max-time 10 {how} -w '\\n{label}=%{{http_code}}\\n' "
                f"http://{hostport}/")

    # -- learn ---------------------------------------------------------------------------

    def test_learn_then_lock_down(self):
        # Loopback stays closed in learn mode, --allow-private or not (that opens only the
        # private-use networks), so this session reaches it by an IP rule, which is learned
        # like any destination reached.  An IP rule is how a loopback address is allowed.
        learned = os.path.join(self.root, "learned.allow")
        result = self.check(self.bw("--learn", learned, "--allow-domain", self.one, script="; ".join([
            self.fetch(self.one), self.fetch(self.one, '-x "$ALL_PROXY"')])))
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
                                        self.fetch(self.one, label="one"),
                                        self.fetch(self.two, label="two"),
                                        self.fetch(other_port, label="port"),
                                        self.fetch("example.com", label="name")])))
        self.assertEqual(result.stdout.count(BODY.decode()), 1)
        for line in ("one=200", "two=403", "port=403", "name=403"):
            self.assertIn(line, result.stdout.split())
        self.assertIn("network: 1 allowed, 3 blocked", result.stderr)
        self.assertNotIn("learn", result.stderr)
        self.assert_clean()

    def test_learn_keeps_private_addresses_closed(self):
        learned = os.path.join(self.root, "learned.allow")
        result = self.check(self.bw("--learn", learned, script=self.fetch(self.one)))
        self.assertNotIn(BODY.decode(), result.stdout)
        self.assertIn("code=403", result.stdout)
        self.assertIn("private addresses stay blocked", result.stderr)
        self.assertIn(f"{self.one} (private address: allow only if you mean it) "
                      f"--allow-domain {self.one}", result.stderr)
        self.assertIn("wrote 0 destinations", result.stderr)
        self.assertEqual(socks_filter.read_rule_file(learned), [])
        self.assert_clean()

    # -- defaults file -------------------------------------------------------------------

    def test_defaults_file_is_applied_and_can_be_overridden(self):
        self.write_config("options", "# mine\n--filter-network --unshare-net\n"
                                     f"--allow-domain {self.one}   # the upstream\n")
        direct = self.fetch(self.one, "--noproxy '*' --connect-timeout 3", "direct")
        result = self.check(self.bw(script=f"{self.fetch(self.one)}; {direct}; exit 0"))
        self.assertEqual(result.stdout.count(BODY.decode()), 1)
        self.assertIn("code=200", result.stdout.split())
        self.assertIn("direct=000", result.stdout.split())
        self.assertIn("bw-claude: network: 1 allowed, 0 blocked", result.stderr)

        result = self.check(self.bw("--no-filter-network", "--share-net", script=direct))
        self.assertIn("direct=200", result.stdout.split())
        self.assertNotIn("network:", result.stderr)

        dry = self.check(self.bw("--dry-run")).stdout
        self.assertIn(f"--allow {self.one}", dry)
        self.assertIn("--unshare-net", dry)
        dry = self.check(self.bw("--dry-run", "--no-defaults")).stdout
        self.assertNotIn("socks_filter", dry)
        self.assertNotIn("--unshare-net", dry)
        self.assert_clean()

    def test_a_bad_defaults_file_is_one_line(self):
        path = self.write_config("options", "--filter-network\n--filter-netwrok\n")
        result = self.bw(script="echo ran")
        self.assertEqual(result.returncode, 2)
        self.assertTrue(one_line(result.stderr), result.stderr)
        self.assertIn(f"bw-claude: error: {path}:2: --filter-netwrok is not a bw-claude option",
                      result.stderr)
        self.assertNotIn("ran", result.stdout)

    # -- doctor --------------------------------------------------------------------------

    def doctor_lines(self, result):
        return {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()
                if line.startswith("  ") and line.split()[0] in ("ok", "note", "FAIL")}

    def test_doctor_passes_here_and_names_a_bad_rule(self):
        result = self.check(self.bw("--doctor"))
        lines = self.doctor_lines(result)
        for name in ("bwrap", "user", "seccomp", "socat", "claude", "allow"):
            self.assertEqual(lines.get(name), "ok", result.stdout)
        self.assertIn("9.9.9 (Fake Code)", result.stdout)
        self.assertIn("everything --filter-network --unshare-net needs works", result.stdout)

        path = self.write_config("allowed-domains", "# mine\nok.example:443\n*.github.io\n")
        result = self.check(self.bw("--doctor", "--allow-preset", "npm"), 1)
        bad = [line for line in result.stdout.splitlines() if f"{path}:3:" in line]
        self.assertEqual(len(bad), 1, result.stdout)
        self.assertEqual(bad[0].split()[:3], ["FAIL", "allow", "list"])
        self.assertIn(f"{path}:3: rule '*.github.io': too broad", bad[0])
        self.assertIn("presets: npm", result.stdout)
        self.assertEqual(result.stderr, "")

    def test_doctor_reports_missing_socat_and_cli(self):
        only_bwrap = os.path.join(self.root, "only-bwrap")
        os.makedirs(only_bwrap)
        os.symlink(shutil.which("bwrap"), os.path.join(only_bwrap, "bwrap"))
        result = self.check(self.bw("--doctor", env={**self.env, "PATH": only_bwrap}), 1)
        lines = self.doctor_lines(result)
        self.assertEqual((lines.get("bwrap"), lines.get("user")), ("ok", "ok"), result.stdout)
        self.assertEqual((lines.get("socat"), lines.get("claude")), ("FAIL", "FAIL"))
        self.assertIn("fix: as root: apt-get install socat", result.stdout)
        self.assertIn("fix: npm install -g @anthropic-ai/claude-code", result.stdout)
        self.assertIn("bw-claude: 2 problems", result.stdout)

    def test_doctor_explains_a_refused_sandbox(self):
        refused = os.path.join(self.root, "refused")
        os.makedirs(refused)
        with open(os.path.join(refused, "bwrap"), "w") as f:
            f.write('#!/bin/sh\n[ "$1" = --version ] && echo "bubblewrap 0.9.0" && exit 0\n'
                    "echo 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
        os.chmod(os.path.join(refused, "bwrap"), 0o755)
        result = self.check(self.bw("--doctor", env={**self.env,
                                                     "PATH": f"{refused}:{self.env['PATH']}"}), 1)
        lines = self.doctor_lines(result)
        self.assertEqual((lines.get("bwrap"), lines.get("user"), lines.get("seccomp")),
                         ("ok", "FAIL", "FAIL"), result.stdout)
        self.assertIn("a trial sandbox failed: bwrap: setting up uid map: Permission denied",
                      result.stdout)
        fix = bw_lib.userns_fix(bw_lib.read_sysctls(bw_lib.USERNS_SYSCTLS))
        self.assertIn(f"fix: {fix}", result.stdout)

    # -- the story when blocked ----------------------------------------------------------

    def blocked_session(self, **kwargs):
        log = os.path.join(self.root, "proxy.jsonl")
        script = "; ".join([self.fetch(self.one), self.fetch("blocked.example"),
                            self.fetch("blocked.example", '-x "$ALL_PROXY"'), self.fetch(self.two)])
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
        seen = b""
        while select.select([master], [], [], 5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:     # EIO: every writer is gone
                break
            if not chunk:
                break
            seen += chunk
        lines = seen.decode().replace("\r\n", "\n").splitlines()
        head = lines.index("bw-claude: network: 1 allowed, 3 blocked:")
        self.assertEqual(lines[head + 1].split()[:3], ["blocked", "times", "why"])
        row = next(line for line in lines[head:] if "blocked.example:80" in line)
        self.assertEqual(row.split()[-2:], ["--allow-domain", "blocked.example:80"])
        with open(log) as f:
            self.assertEqual(bw_lib.summarize("bw-claude", f, width=160),
                             "\n".join(lines[head:head + 4]))
        self.assert_clean()


if __name__ == "__main__":
    unittest.main()
