"""Unit tests of bw_lib's decisions: options, profile lookup, bwrap and proxy command lines,
the end-of-session summary and the state merge.  No namespaces, no processes."""

import contextlib
import io
import json
import os
import shutil
import socket
import signal
import stat
import sys
import tempfile
import unittest
from contextlib import redirect_stdout

import bw_lib
from bw_lib import PROFILES, Failure

CLAUDE = PROFILES["claude"]
GEMINI = PROFILES["gemini"]


def write(path, text="", mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class Fixture(unittest.TestCase):
    """A temporary HOME with a fake CLI, a project and some secrets."""

    def setUp(self):
        self.root = os.path.realpath(tempfile.mkdtemp(prefix="bw-unit-"))
        self.addCleanup(shutil.rmtree, self.root)
        self.home = os.path.join(self.root, "home")
        self.bin = os.path.join(self.root, "bin")
        self.project = os.path.join(self.root, "project")
        os.makedirs(self.project)
        write(os.path.join(self.home, ".ssh", "id_rsa"), "PRIVATE KEY", 0o600)
        write(os.path.join(self.home, ".config", "gh", "hosts.yml"), "token: x")
        write(os.path.join(self.home, ".config", "app.conf"), "ok")
        write(os.path.join(self.home, ".cargo", "bin", "cargo"), "", 0o755)
        write(os.path.join(self.home, ".cargo", "credentials.toml"), "token")
        write(os.path.join(self.home, "notes.txt"), "notes")
        self.cli = write(os.path.join(self.bin, "claude"), "#!/bin/sh\n", 0o755)
        self.environ = {"HOME": self.home, "PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8",
                        "TERM": "xterm", "LC_TIME": "C", "ANTHROPIC_API_KEY": "sk-test",
                        "AWS_SECRET_ACCESS_KEY": "aws", "GITHUB_TOKEN": "gh", "FOO": "foo"}

    def plan(self, *argv, profile=CLAUDE):
        opts = bw_lib.parse_args(profile, ["--dir", self.project, *argv])
        return bw_lib.make_plan(profile, opts, self.environ)


class ParseArgsTest(unittest.TestCase):
    def test_unknown_options_go_to_the_cli_in_order(self):
        opts = bw_lib.parse_args(CLAUDE, ["--model", "opus", "-v", "--resume", "abc", "-p", "hi"])
        self.assertTrue(opts.verbose)
        self.assertEqual(opts.args, ["--model", "opus", "--resume", "abc", "-p", "hi"])

    def test_everything_after_double_dash_goes_to_the_cli(self):
        opts = bw_lib.parse_args(CLAUDE, ["--shell", "--", "-c", "echo --dir", "-v", "--"])
        self.assertTrue(opts.shell)
        self.assertFalse(opts.verbose)
        self.assertEqual(opts.args, ["-c", "echo --dir", "-v", "--"])

    def test_repeatable_options(self):
        opts = bw_lib.parse_args(CLAUDE, [
            "--filter-network", "--allow-domain", "a.example", "--allow-domain", "*.b.example:443",
            "--allow-ro", "/x", "--allow-ro", "/y", "--pass-env", "A", "--pass-env", "B",
            "--env", "X=1", "--env", "Y=a=b"])
        self.assertEqual(opts.allow_domain, ["a.example", "*.b.example:443"])
        self.assertEqual(opts.allow_ro, ["/x", "/y"])
        self.assertEqual(opts.pass_env, ["A", "B"])
        self.assertEqual(opts.env, ["X=1", "Y=a=b"])

    def test_no_abbreviations(self):
        # An abbreviation of ours is not taken as ours, nor passed on: a typo (issue 13).
        for argv in (["--verb"], ["--filter"]):
            with self.assertRaises(Failure):
                bw_lib.parse_args(CLAUDE, argv)
        opts = bw_lib.parse_args(CLAUDE, ["--", "--verb", "--filter"])
        self.assertFalse(opts.verbose)
        self.assertEqual(opts.args, ["--verb", "--filter"])

    def test_contradictions_and_bad_values_are_usage_errors(self):
        for argv in (["--learn", "learned", "--no-network"],
                     ["--filter-network", "--allow-preset", "nope"],
                     ["--allow-private"],
                     ["--allow-domain", "x.example"],
                     ["--allow-file", "/etc/hosts"],
                     ["--proxy-log", "/tmp/log"],
                     ["--env", "NOEQUALS"],
                     ["--env", "1BAD=x"],
                     ["--pass-env", "A-B"],
                     ["--dir"]):
            with self.subTest(argv=argv), self.assertRaises(Failure) as caught:
                bw_lib.parse_args(CLAUDE, argv)
            self.assertEqual(caught.exception.code, 2)
            self.assertNotIn("\n", str(caught.exception))

    def test_no_skip_permissions_only_for_profiles_that_skip(self):
        self.assertTrue(bw_lib.parse_args(CLAUDE, ["--no-skip-permissions"]).no_skip_permissions)
        opts = bw_lib.parse_args(GEMINI, ["--no-skip-permissions"])
        self.assertEqual(opts.args, ["--no-skip-permissions"])

    def test_help_teaches(self):
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            bw_lib.parse_args(CLAUDE, ["--help"])
        self.assertEqual(caught.exception.code, 0)
        text = out.getvalue()
        for needle in ("sandbox:", "network:", "diagnostics:", "--filter-network --share-net",
                       "--allow-domain", "allowed-domains", "examples:"):
            self.assertIn(needle, text)


class LookupTest(Fixture):
    def test_path_first(self):
        write(os.path.join(self.home, ".local", "bin", "claude"), "", 0o755)
        self.assertEqual(bw_lib.find_cli(CLAUDE, self.environ["PATH"], self.home), self.cli)

    def test_home_fallbacks_in_order(self):
        os.remove(self.cli)
        local = write(os.path.join(self.home, ".local", "bin", "claude"), "", 0o755)
        self.assertEqual(bw_lib.find_cli(CLAUDE, self.environ["PATH"], self.home), local)
        first = write(os.path.join(self.home, ".claude", "local", "claude"), "", 0o755)
        self.assertEqual(bw_lib.find_cli(CLAUDE, self.environ["PATH"], self.home), first)

    def test_not_executable_is_not_found(self):
        os.chmod(self.cli, 0o644)
        self.assertIsNone(bw_lib.find_cli(CLAUDE, self.bin, self.home))

    def test_our_own_entry_script_is_skipped(self):
        other = write(os.path.join(self.root, "bin2", "claude"), "", 0o755)
        path = f"{self.bin}:{os.path.dirname(other)}"
        self.assertEqual(bw_lib.find_cli(CLAUDE, path, self.home, skip=(self.cli,)), other)

    def test_missing_cli_is_one_line_with_hint_and_127(self):
        os.remove(self.cli)
        with self.assertRaises(Failure) as caught:
            self.plan()
        self.assertEqual(caught.exception.code, 127)
        message = str(caught.exception)
        self.assertIn("~/.claude/local/claude", message)
        self.assertIn("npm install -g @anthropic-ai/claude-code", message)

    def test_shell_mode_does_not_need_the_cli(self):
        os.remove(self.cli)
        plan = self.plan("--shell", "--", "-c", "true")
        self.assertEqual(plan.command[1:], ["-c", "true"])

    def test_gemini_needs_node(self):
        write(os.path.join(self.bin, "gemini"), "#!/usr/bin/env node\n", 0o755)
        self.environ["PATH"] = self.bin
        with self.assertRaises(Failure) as caught:
            self.plan(profile=GEMINI)
        self.assertIn("node not found", str(caught.exception))

    def test_symlink_chain_and_npm_install_root(self):
        package = os.path.join(self.root, "prefix", "lib", "node_modules", "@x", "cli")
        real = write(os.path.join(package, "bin", "cli.js"), "", 0o755)
        link_dir = os.path.join(self.root, "prefix", "bin")
        os.makedirs(link_dir)
        link = os.path.join(link_dir, "claude")
        os.symlink("../lib/node_modules/@x/cli/bin/cli.js", link)
        chain = bw_lib.symlink_chain(link)
        self.assertEqual(chain[0], link)
        self.assertEqual(chain[-1], real)
        roots = bw_lib.install_roots(chain, self.home)
        self.assertEqual(roots, [link_dir, os.path.join(self.root, "prefix", "lib", "node_modules")])

    def test_install_roots_skip_system_and_never_the_whole_home(self):
        self.assertEqual(bw_lib.install_roots(["/usr/bin/node"], self.home), [])
        in_home = os.path.join(self.home, "claude")
        self.assertEqual(bw_lib.install_roots([in_home], self.home), [in_home])


class EnvTest(Fixture):
    def test_allow_list_then_profile_then_pass_env_then_env(self):
        env = bw_lib.build_env(CLAUDE, self.environ, self.home, pass_env=["FOO", "UNSET"],
                               assignments=["LANG=fr_FR.UTF-8", "IS_SANDBOX=0", "NEW=a=b"])
        self.assertEqual(env["HOME"], self.home)
        self.assertEqual(env["TERM"], "xterm")
        self.assertEqual(env["LC_TIME"], "C")
        self.assertEqual(env["ANTHROPIC_API_KEY"], "sk-test")
        self.assertEqual(env["FOO"], "foo")
        self.assertEqual(env["LANG"], "fr_FR.UTF-8")
        self.assertEqual(env["IS_SANDBOX"], "0")
        self.assertEqual(env["NEW"], "a=b")
        for hidden in ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "UNSET"):
            self.assertNotIn(hidden, env)

    def test_profiles_pass_only_their_own_keys(self):
        self.environ["GEMINI_API_KEY"] = "g"
        self.assertNotIn("GEMINI_API_KEY", bw_lib.build_env(CLAUDE, self.environ, self.home))
        env = bw_lib.build_env(GEMINI, self.environ, self.home)
        self.assertEqual(env["GEMINI_API_KEY"], "g")
        self.assertNotIn("ANTHROPIC_API_KEY", env)

    def test_printed_commands_hide_secret_values(self):
        text = bw_lib.format_env_command({"ANTHROPIC_API_KEY": "sk-test", "TERM": "xterm"},
                                         ["bwrap", "a b"])
        self.assertNotIn("sk-test", text)
        self.assertIn("'ANTHROPIC_API_KEY=<hidden>'", text)
        self.assertIn("TERM=xterm", text)
        self.assertTrue(text.endswith("bwrap 'a b'"))


class MountsTest(Fixture):
    def dests(self, plan, option=None):
        return [m[2] for m in plan.mounts if option is None or m[0] == option]

    def test_default_home_has_state_rw_tools_ro_and_secrets_masked(self):
        plan = self.plan()
        home = self.home
        # The CLI's state is the session's own copy (tests/test_state.py), not a bind.
        self.assertNotIn(f"{home}/.claude", self.dests(plan))
        self.assertIn(("--bind", f"{home}/.claude", f"{home}/.claude"),
                      self.plan("--allow-config-writes").mounts)
        self.assertIn(("--ro-bind", f"{home}/.cargo", f"{home}/.cargo"), plan.mounts)
        self.assertIn(("--ro-bind", "/dev/null", f"{home}/.cargo/credentials.toml"), plan.mounts)
        self.assertIn(("--bind", self.project, self.project), plan.mounts)
        self.assertIn(("--ro-bind", self.bin, self.bin), plan.mounts)
        for absent in (".ssh", ".config", "notes.txt", ".local/bin", ".claude.json"):
            self.assertNotIn(os.path.join(home, absent), self.dests(plan))

    def test_full_home_hides_secrets(self):
        plan = self.plan("--full-home-access")
        home = self.home
        self.assertIn(("--ro-bind", f"{home}/notes.txt", f"{home}/notes.txt"), plan.mounts)
        self.assertIn(("--ro-bind", f"{home}/.config", f"{home}/.config"), plan.mounts)
        self.assertIn(("--tmpfs", None, f"{home}/.config/gh"), plan.mounts)
        self.assertNotIn(f"{home}/.ssh", [m[1] for m in plan.mounts])
        self.assertNotIn(f"{home}/.claude.json", [m[1] for m in plan.mounts])
        self.assertNotIn(f"{home}/.claude", [m[1] for m in plan.mounts])

    def test_full_home_skips_sockets_and_links_to_secrets_or_home(self):
        os.symlink(os.path.join(self.home, ".ssh"), os.path.join(self.home, "keys"))
        os.symlink("/", os.path.join(self.home, "root"))
        os.symlink("notes.txt", os.path.join(self.home, "notes-link"))
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(os.path.join(self.home, "agent.sock"))
        entries = bw_lib.showable_entries(self.home)
        self.assertIn("notes-link", entries)
        self.assertIn(".config", entries)
        for hidden in ("keys", "root", "agent.sock", ".ssh"):
            self.assertNotIn(hidden, entries)

    def test_extra_binds(self):
        extra, shared = os.path.join(self.root, "data"), os.path.join(self.root, "shared")
        os.makedirs(extra)
        os.makedirs(shared)
        plan = self.plan("--allow-ro", extra, "--allow-rw", shared)
        self.assertIn(("--ro-bind", extra, extra), plan.mounts)
        self.assertIn(("--bind", shared, shared), plan.mounts)

    def test_refusals(self):
        cases = [("--allow-ro", os.path.join(self.root, "missing"), "no such file"),
                 ("--allow-ro", os.path.join(self.home, ".ssh"), "secrets"),
                 ("--allow-rw", os.path.join(self.home, ".ssh", "id_rsa"), "secrets"),
                 ("--allow-ro", self.home, "home directory"),
                 ("--allow-rw", "/", "home directory")]
        for flag, path, needle in cases:
            with self.subTest(path=path), self.assertRaises(Failure) as caught:
                self.plan(flag, path)
            self.assertIn(needle, str(caught.exception))
        for project in (self.home, os.path.join(self.home, ".ssh")):
            opts = bw_lib.parse_args(CLAUDE, ["--dir", project])
            with self.subTest(project=project), self.assertRaises(Failure):
                bw_lib.make_plan(CLAUDE, opts, self.environ)

    def test_allow_files(self):
        user_file = write(os.path.join(self.home, ".config", "bw-claude", "allowed-domains"),
                          "x.example\n")
        mine = write(os.path.join(self.root, "mine"), "y.example\n")
        plan = self.plan("--filter-network", "--allow-file", mine, "--allow-domain", "z.example")
        self.assertEqual(plan.allow_files, [user_file, mine])
        self.assertEqual(plan.allow, [*CLAUDE.allow, "z.example"])
        with self.assertRaises(Failure):
            self.plan("--filter-network", "--allow-file", os.path.join(self.root, "nope"))


class BwrapArgsTest(Fixture):
    def args(self, *argv, **changes):
        plan = self.plan(*argv)
        for key, value in changes.items():
            setattr(plan, key, value)
        return bw_lib.build_bwrap_args(plan, "/PRIV", 9)

    def test_namespaces_and_no_new_session(self):
        args = self.args()
        for option in ("--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                       "--unshare-cgroup-try"):
            self.assertIn(option, args)
        self.assertEqual(args[args.index("--cap-drop") + 1], "ALL")
        self.assertNotIn("--new-session", args)
        self.assertNotIn("--unshare-net", args)
        self.assertEqual(args[args.index("--json-status-fd") + 1], "9")
        self.assertEqual(args[args.index("--chdir") + 1], self.project)

    def test_unshare_net_and_no_network(self):
        self.assertIn("--unshare-net", self.args("--unshare-net"))
        self.assertIn("--unshare-net", self.args("--no-network"))

    def test_environment_is_not_on_the_command_line(self):
        args = self.args()
        self.assertFalse(any("sk-test" in a for a in args))
        self.assertNotIn("--setenv", args)

    def test_private_tmp_and_session_home(self):
        args = self.args()
        triples = list(zip(args, args[1:], args[2:]))
        self.assertIn(("--bind", "/PRIV/home", self.home), triples)
        self.assertIn(("--tmpfs", "/tmp", "--tmpfs"), triples)
        sources = [args[i + 1] for i, a in enumerate(args) if a in ("--bind", "--ro-bind")]
        for host_dir in ("/tmp", "/run", "/var/run", self.environ.get("XDG_RUNTIME_DIR", "/run")):
            self.assertFalse([s for s in sources if bw_lib.is_within(s, host_dir)
                              and not bw_lib.is_within(s, self.root)], host_dir)

    def test_parents_are_mounted_before_children(self):
        args = self.args("--full-home-access")
        positions = {}
        for i, a in enumerate(args[:args.index("--")]):
            if a in ("--bind", "--ro-bind", "--tmpfs", "--dev", "--proc", "--symlink"):
                dest = args[i + 1] if a in ("--tmpfs", "--dev", "--proc") else args[i + 2]
                positions.setdefault(dest, i)
        for child, at in positions.items():
            for parent, parent_at in positions.items():
                if child != parent and bw_lib.is_within(child, parent):
                    self.assertLess(parent_at, at, f"{parent} must come before {child}")
        self.assertLess(positions["/tmp"], positions[self.project])
        self.assertLess(positions[self.home], positions[f"{self.home}/.cargo"])

    def test_masks_come_after_what_they_hide_and_are_read_only(self):
        args = self.args("--full-home-access")
        gh = f"{self.home}/.config/gh"
        at = args.index(gh)
        self.assertEqual(args[at - 1], "--tmpfs")
        self.assertEqual(args[at + 1:at + 3], ["--remount-ro", gh])
        self.assertLess(args.index(f"{self.home}/.config"), at)

    def test_system_layout_follows_the_host(self):
        plan = self.plan()
        plan.system = [("/usr", None), ("/bin", "usr/bin")]
        args = bw_lib.build_bwrap_args(plan, "/PRIV")
        self.assertIn(["--ro-bind", "/usr", "/usr"], [args[i:i + 3] for i in range(len(args))])
        self.assertIn(["--symlink", "usr/bin", "/bin"], [args[i:i + 3] for i in range(len(args))])
        self.assertNotIn("/etc/shadow", args)
        self.assertFalse(any(a.startswith("/etc/ssh") for a in args))

    def test_command_cli_args_and_signal_reset(self):
        plan = self.plan("--resume", "x")
        plan.env_program = "/usr/bin/env"
        args = bw_lib.build_bwrap_args(plan, "/PRIV")
        self.assertEqual(args[args.index("--") + 1:], [
            "/usr/bin/env", "--default-signal=INT,QUIT", self.cli,
            "--allow-dangerously-skip-permissions", "--resume", "x"])
        plan = self.plan("--no-skip-permissions", "--", "-p", "hi")
        plan.env_program = None
        args = bw_lib.build_bwrap_args(plan, "/PRIV")
        self.assertEqual(args[args.index("--") + 1:], [self.cli, "-p", "hi"])

    def test_filter_network_runs_the_bridge_with_the_socket(self):
        plan = self.plan("--filter-network", "--unshare-net")
        plan.env_program = None
        args = bw_lib.build_bwrap_args(plan, "/PRIV")
        triples = list(zip(args, args[1:], args[2:]))
        self.assertIn(("--ro-bind", "/PRIV/proxy.sock", bw_lib.SANDBOX_SOCKET), triples)
        self.assertIn(("--ro-bind", bw_lib.BRIDGE_SCRIPT, bw_lib.SANDBOX_BRIDGE), triples)
        self.assertEqual(args[args.index("--") + 1:args.index("--") + 5],
                         ["/bin/sh", bw_lib.SANDBOX_BRIDGE, plan.socat, bw_lib.SANDBOX_SOCKET])
        self.assertIn("--unshare-net", args)

    def test_proxy_command(self):
        allow = write(os.path.join(self.root, "allow"), "x.example\n")
        plan = self.plan("--filter-network", "--allow-domain", "127.0.0.1:8080",
                         "--allow-file", allow)
        args = bw_lib.build_proxy_args(plan, "/PRIV", 5)
        self.assertEqual(args[1:4], ["-I", "-S", bw_lib.FILTER_SCRIPT])
        self.assertEqual(args[4:6], ["--listen", "/PRIV/proxy.sock"])
        pairs = list(zip(args, args[1:]))
        for rule in (*CLAUDE.allow, "127.0.0.1:8080"):
            self.assertIn(("--allow", rule), pairs)
        self.assertIn(("--allow", "x.example"), pairs)     # the file's rules, read once
        self.assertIn(("--log", "/PRIV/proxy.log"), pairs)
        self.assertEqual(args[-2:], ["--ready-fd", "5"])
        for telemetry in ("sentry.io", "statsig.anthropic.com", "play.googleapis.com"):
            self.assertNotIn(telemetry, args)
        plan.proxy_log = "/keep/log.jsonl"
        args = bw_lib.build_proxy_args(plan, "/PRIV", 5)
        self.assertEqual(args[args.index("--log") + 1], "/keep/log.jsonl")

    def test_dry_run_prints_and_creates_nothing(self):
        runtime = os.path.join(self.root, "run")
        os.makedirs(runtime)
        self.environ["XDG_RUNTIME_DIR"] = runtime
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(bw_lib.Finished) as finished:
            bw_lib.plan_session(CLAUDE, ["--dir", self.project, "--dry-run", "--filter-network",
                                         "--unshare-net"], self.environ)
        self.assertEqual(finished.exception.code, 0)
        proxy_line, bwrap_line = out.getvalue().splitlines()
        self.assertIn("socks_filter.py --listen " + runtime, proxy_line)
        self.assertTrue(bwrap_line.startswith("env -i "))
        self.assertIn("bwrap --die-with-parent", bwrap_line)
        self.assertIn("--unshare-net", bwrap_line)
        self.assertNotIn("sk-test", bwrap_line)
        self.assertEqual(os.listdir(runtime), [])
        self.assertFalse(os.path.exists(os.path.join(self.home, ".claude")))


class LastResortTest(unittest.TestCase):
    def setUp(self):
        handlers = {sig: signal.getsignal(sig)
                    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
        self.addCleanup(lambda: [signal.signal(s, h) for s, h in handlers.items()])

    def leave(self, error):
        """What the Wrapper does with `error` raised inside it: (exit status, stderr)."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as caught:
            with bw_lib.Wrapper("claude"):
                raise error
        return caught.exception.code, err.getvalue()

    def test_an_unexpected_error_is_one_line(self):
        self.assertEqual(self.leave(RuntimeError("boom\nsecond line")),
                         (1, "bw-claude: error: unexpected RuntimeError: boom?second line\n"))

    def test_each_way_out_has_its_status(self):
        self.assertEqual(self.leave(bw_lib.Failure("no", 2)), (2, "bw-claude: error: no\n"))
        self.assertEqual(self.leave(bw_lib.Terminated(signal.SIGTERM)), (143, ""))
        self.assertEqual(self.leave(KeyboardInterrupt()), (130, ""))
        self.assertEqual(self.leave(bw_lib.Finished(3)), (3, ""))

    def test_the_status_set_inside_is_the_exit_status(self):
        with self.assertRaises(SystemExit) as caught:
            with bw_lib.Wrapper("claude") as session:
                session.status = 7
        self.assertEqual(caught.exception.code, 7)


class SummaryTest(unittest.TestCase):
    def lines(self, *records):
        return [json.dumps(r) for r in records]

    def test_counts_groups_and_options(self):
        deny = {"event": "decision", "decision": "deny", "mode": "enforce"}
        lines = self.lines(
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
        lines = self.lines({"event": "decision", "decision": "deny", "host": "x\x1b[2Jy\n",
                            "port": 443, "reason": "bad-name"})
        text = bw_lib.summarize("bw-claude", lines)
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\n", text)
        self.assertIn("x?[2Jy?:443 (malformed name)", text)

    def test_long_lists_are_cut(self):
        lines = self.lines(*[{"event": "decision", "decision": "deny", "host": f"h{i}.example",
                              "port": 443, "reason": "not-in-allowlist"} for i in range(15)])
        text = bw_lib.summarize("bw-claude", lines)
        self.assertIn("and 5 more (see --proxy-log)", text)
        self.assertEqual(text.count("--allow-domain"), bw_lib.SUMMARY_HOSTS)


class StateMergeTest(unittest.TestCase):
    def test_merge_json_keeps_both_sides(self):
        base = {"n": 1, "projects": {"/a": {"x": 1}}, "gone": 1, "theirs": 1}
        ours = {"n": 2, "projects": {"/a": {"x": 1}, "/b": {"y": 2}}, "theirs": 1}
        theirs = {"n": 1, "projects": {"/a": {"x": 5}}, "gone": 1, "theirs": 2, "new": 3}
        self.assertEqual(bw_lib.merge_json(base, ours, theirs), {
            "n": 2, "projects": {"/a": {"x": 5}, "/b": {"y": 2}}, "theirs": 2, "new": 3})

    def test_ours_wins_a_conflict(self):
        self.assertEqual(bw_lib.merge_json({"k": 1}, {"k": 2}, {"k": 3}), {"k": 2})

    def test_merge_state(self):
        self.assertIsNone(bw_lib.merge_state(b"{}", b"{}", b'{"a": 1}'))
        self.assertIsNone(bw_lib.merge_state(b"{}", None, b"{}"))
        self.assertEqual(bw_lib.merge_state(b"{}", b'{"a":1}', b"{}"), b'{"a":1}')
        self.assertEqual(bw_lib.merge_state(None, b'{"a":1}', None), b'{"a":1}')
        merged = bw_lib.merge_state(b'{"a": 1}', b'{"a": 2}', b'{"a": 1, "b": 3}')
        self.assertEqual(json.loads(merged), {"a": 2, "b": 3})
        self.assertEqual(bw_lib.merge_state(b"{}", b"broken", b'{"b": 1}'), b"broken")

    def test_write_place_is_atomic_and_keeps_the_mode(self):
        root = tempfile.mkdtemp(prefix="bw-unit-")
        self.addCleanup(shutil.rmtree, root)
        path = write(os.path.join(root, ".claude.json"), '{"a": 1}', 0o600)
        bw_lib.write_place((root, [], ".claude.json"), b'{"a": 2}\n')
        with open(path) as f:
            self.assertEqual(json.load(f), {"a": 2})
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(root)), [".claude.json"])

    def test_read_at_refuses_symlinks_fifos_and_directories(self):
        root = tempfile.mkdtemp(prefix="bw-unit-")
        self.addCleanup(shutil.rmtree, root)
        target = write(os.path.join(root, "target"), "secret")
        os.symlink(target, os.path.join(root, "link"))
        os.mkfifo(os.path.join(root, "fifo"))
        os.mkdir(os.path.join(root, "d.jsonl"))
        self.assertEqual(bw_lib.read_at(None, target), b"secret")
        for name in ("link", "fifo", "d.jsonl", "missing"):
            self.assertIsNone(bw_lib.read_at(None, os.path.join(root, name)), name)

    def test_state_json_must_be_strict(self):
        # Python reads NaN, Infinity and 1e999; Node does not, and Claude takes the file
        # for corrupt and replaces it: none of them may reach a host state file.
        for text in (b'{"theme": NaN}', b'{"numStartups": 1e999}', b'{"a": -Infinity}'):
            with self.subTest(text=text):
                self.assertIsNone(bw_lib.parse_json(text))
                self.assertIsNone(bw_lib.guarded_changes(b"{}", text, ("theme", "numStartups",
                                                                       "a")))
        self.assertEqual(bw_lib.parse_json(b'{"a": 1.5e3}'), {"a": 1500.0})

if __name__ == "__main__":
    unittest.main()
