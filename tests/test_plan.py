"""bw_lib's decisions, pure: options and the defaults file, CLI lookup, the environment, mounts
and protection, the bwrap and proxy command lines, the seccomp program, presets, allow files,
doctor's verdicts and the way out of the wrapper.  No namespaces, no sandbox."""

import contextlib
import io
import os
import signal
import socket
import struct
import tempfile
import unittest

import bw_lib
import socks_filter
from bw_lib import PROFILES, Failure
from tests.sandbox_harness import temporary_root, write_file

CLAUDE = PROFILES["claude"]
GEMINI = PROFILES["gemini"]


def parse(*argv, defaults=()):
    """bw-claude's options: `argv` on the command line after the defaults file's tokens."""
    return bw_lib.parse_args(CLAUDE, list(argv), list(defaults))


class Fixture(unittest.TestCase):
    """A temporary HOME with a fake CLI, a project and some secrets."""

    def setUp(self):
        self.root = temporary_root(self, "bw-unit-")
        self.home = os.path.join(self.root, "home")
        self.bin = os.path.join(self.root, "bin")
        self.project = os.path.join(self.root, "project")
        os.makedirs(self.project)
        write_file(os.path.join(self.home, ".ssh", "id_rsa"), "PRIVATE KEY", 0o600)
        write_file(os.path.join(self.home, ".config", "gh", "hosts.yml"), "token: x")
        write_file(os.path.join(self.home, ".config", "app.conf"), "ok")
        write_file(os.path.join(self.home, ".cargo", "bin", "cargo"), "", 0o755)
        write_file(os.path.join(self.home, ".cargo", "credentials.toml"), "token")
        write_file(os.path.join(self.home, "notes.txt"), "notes")
        self.cli = write_file(os.path.join(self.bin, "claude"), "#!/bin/sh\n", 0o755)
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
        # An abbreviation of ours is not taken as ours, nor passed on: it is a typo.
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


class HelpTest(unittest.TestCase):
    def help_text(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            bw_lib.parse_args(CLAUDE, ["--help"])
        self.assertEqual(caught.exception.code, 0)
        return out.getvalue()

    def test_help_teaches(self):
        text = self.help_text()
        for needle in ("sandbox:", "network:", "diagnostics:", "--filter-network --share-net",
                       "--allow-domain", "allowed-domains", "examples:"):
            self.assertIn(needle, text)

    def test_help_groups_have_an_example_each(self):
        text = self.help_text()
        flat = " ".join(text.split())
        for group in ("sandbox:", "network:", "diagnostics:"):
            following = text.split("\n" + group + "\n", 1)[1].splitlines()[0]
            self.assertIn("e.g. bw-claude --", following, group)
        for needle in ("--learn FILE", "--allow-preset NAME", "--doctor", "--list-presets",
                       "(undo: --share-net)", "(undo: --no-filter-network)", "DANGEROUS",
                       ".config/bw-claude/options"):
            self.assertIn(needle, flat)


class SwitchesAndDefaultsTest(unittest.TestCase):
    def test_the_last_switch_wins_and_the_command_line_comes_last(self):
        defaults = ["--filter-network", "--unshare-net", "--full-home-access", "-v"]
        opts = parse(defaults=defaults)
        self.assertEqual((opts.filter_network, opts.unshare_net, opts.full_home_access,
                          opts.verbose), (True, True, True, True))
        opts = parse("--no-filter-network", "--share-net", "--no-full-home-access",
                          "--no-verbose", defaults=defaults)
        self.assertEqual((opts.filter_network, opts.unshare_net, opts.full_home_access,
                          opts.verbose), (False, False, False, False))
        self.assertTrue(parse("--no-skip-permissions").no_skip_permissions)
        self.assertFalse(parse("--skip-permissions",
                                    defaults=["--no-skip-permissions"]).no_skip_permissions)
        self.assertFalse(parse("--no-allow-config-writes",
                                    defaults=["--allow-config-writes"]).allow_config_writes)

    def test_no_network_is_unshare_without_filter(self):
        opts = parse("--no-network")
        self.assertEqual((opts.filter_network, opts.unshare_net), (False, True))
        opts = parse("--filter-network", defaults=["--no-network"])
        self.assertEqual((opts.filter_network, opts.unshare_net), (True, True))

    def test_learn_implies_filter_and_unshare_unless_told_otherwise(self):
        opts = parse("--learn", "out")
        self.assertEqual((opts.filter_network, opts.unshare_net), (True, True))
        self.assertFalse(parse("--learn", "out", "--share-net").unshare_net)
        with self.assertRaises(Failure) as caught:
            parse("--learn", "out", "--no-filter-network")
        self.assertIn("contradict", str(caught.exception))

    def test_filter_options_from_the_defaults_file_are_ignored_without_the_filter(self):
        defaults = ["--filter-network", "--allow-domain", "x.example", "--allow-preset", "npm"]
        opts = parse("--no-filter-network", defaults=defaults)
        self.assertFalse(opts.filter_network)
        with self.assertRaises(Failure) as caught:
            parse("--allow-preset", "npm")
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



class NetworkOptionsTest(unittest.TestCase):
    def test_filter_network_is_enforced_on_its_own(self):
        self.assertTrue(parse("--filter-network").unshare_net)
        self.assertFalse(parse("--filter-network", "--share-net").unshare_net)
        self.assertFalse(parse().unshare_net)
        opts = parse("--filter-network")
        self.assertIsNone(bw_lib.advisory_token(opts))
        advisory = parse("--filter-network", "--share-net")
        one, two = bw_lib.advisory_token(advisory), bw_lib.advisory_token(advisory)
        self.assertNotEqual(one, two)
        self.assertRegex(one, r"^[A-Za-z0-9_-]{32}$")

    def test_host_ports(self):
        opts = parse("--filter-network", "--host-port", "8000", "--host-port", "5432:6543")
        self.assertEqual(opts.host_port, [(8000, 8000), (5432, 6543)])
        from_file = parse(defaults=["--filter-network", "--host-port", "3000"])
        self.assertEqual(from_file.host_port, [(3000, 3000)])
        self.assertEqual(parse("--filter-network", "--share-net",
                                    defaults=["--host-port", "3000"]).host_port, [])
        for argv in (["--host-port", "80"], ["--filter-network", "--share-net", "--host-port", "80"],
                     ["--filter-network", "--host-port", "0"], ["--filter-network", "--host-port", "080"],
                     ["--filter-network", "--host-port", "1:70000"],
                     ["--filter-network", "--host-port", "a:b"],
                     ["--filter-network", "--host-port", "8000:"],
                     ["--filter-network", "--host-port", "80", "--host-port", "80:81"]):
            with self.subTest(argv=argv), self.assertRaises(bw_lib.Failure) as caught:
                parse(*argv)
            self.assertEqual(caught.exception.code, 2)

    def test_loopback_rules_get_a_hint(self):
        hints = bw_lib.loopback_hints(["127.0.0.1:8001", "127.0.0.0/8:9000", "[::1]:3000",
                                       "127.0.0.2:8080", "example.com:443"])
        self.assertEqual(len(hints), 3, hints)
        self.assertIn("--host-port 8001", hints[0])
        self.assertIn("--host-port 3000", hints[2])


class MisspeltOptionTest(unittest.TestCase):
    def test_typos_and_prefixes_are_refused_with_a_suggestion(self):
        cases = {"--filter-netwrok": "--filter-network", "--filter": "--filter-network",
                 "--unshare-network": "--unshare-net", "--allow-domains": "--allow-domain",
                 "--alow-file": "--allow-file", "--full-home": "--full-home-access",
                 "--dry": "--dry-run", "--allow-presets=npm": "--allow-preset"}
        for token, suggestion in cases.items():
            for profile in (CLAUDE, GEMINI):
                with self.subTest(token=token, tool=profile.tool):
                    with self.assertRaises(Failure) as caught:
                        bw_lib.parse_args(profile, [token])
                    self.assertEqual(caught.exception.code, 2)
                    self.assertIn(f"did you mean {suggestion}", str(caught.exception))

    def test_the_clis_options_pass_through(self):
        for profile in (CLAUDE, GEMINI):
            for option in profile.cli_options:
                with self.subTest(option=option, tool=profile.tool):
                    opts = bw_lib.parse_args(profile, [option, "value"])
                    self.assertEqual(opts.args, [option, "value"])
        opts = bw_lib.parse_args(CLAUDE, ["--model", "opus", "--add-dir", "/x", "--resume",
                                          "-p", "fix the --filter bug", "--", "--filter"])
        self.assertEqual(opts.args, ["--model", "opus", "--add-dir", "/x", "--resume", "-p",
                                     "fix the --filter bug", "--filter"])
        # Far from anything of ours: the CLI's business (a newer CLI's option).
        self.assertEqual(bw_lib.parse_args(CLAUDE, ["--brand-new-option"]).args,
                         ["--brand-new-option"])


class LookupTest(Fixture):
    def test_path_first(self):
        write_file(os.path.join(self.home, ".local", "bin", "claude"), "", 0o755)
        self.assertEqual(bw_lib.find_cli(CLAUDE, self.environ["PATH"], self.home), self.cli)

    def test_home_fallbacks_in_order(self):
        os.remove(self.cli)
        local = write_file(os.path.join(self.home, ".local", "bin", "claude"), "", 0o755)
        self.assertEqual(bw_lib.find_cli(CLAUDE, self.environ["PATH"], self.home), local)
        first = write_file(os.path.join(self.home, ".claude", "local", "claude"), "", 0o755)
        self.assertEqual(bw_lib.find_cli(CLAUDE, self.environ["PATH"], self.home), first)

    def test_not_executable_is_not_found(self):
        os.chmod(self.cli, 0o644)
        self.assertIsNone(bw_lib.find_cli(CLAUDE, self.bin, self.home))

    def test_our_own_entry_script_is_skipped(self):
        other = write_file(os.path.join(self.root, "bin2", "claude"), "", 0o755)
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
        write_file(os.path.join(self.bin, "gemini"), "#!/usr/bin/env node\n", 0o755)
        self.environ["PATH"] = self.bin
        with self.assertRaises(Failure) as caught:
            self.plan(profile=GEMINI)
        self.assertIn("node not found", str(caught.exception))

    def test_symlink_chain_and_npm_install_root(self):
        package = os.path.join(self.root, "prefix", "lib", "node_modules", "@x", "cli")
        real = write_file(os.path.join(package, "bin", "cli.js"), "", 0o755)
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

    def test_variable_patterns_are_names_or_prefixes(self):
        # build_env reads a "*" only at the end: anything else would be taken literally.
        for profile in (CLAUDE, GEMINI):
            for pattern in bw_lib.ENV_NAMES + profile.env_names:
                with self.subTest(pattern=pattern):
                    self.assertRegex(pattern, r"\A[A-Za-z_][A-Za-z0-9_]*\*?\Z")
        self.environ.update({"LC_": "empty suffix", "XLC_ALL": "x", "LC_ALL": "C"})
        env = bw_lib.build_env(CLAUDE, self.environ, self.home)
        self.assertEqual((env.get("LC_"), env.get("LC_ALL")), ("empty suffix", "C"))
        self.assertNotIn("XLC_ALL", env)

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
        user_file = write_file(os.path.join(self.home, ".config", "bw-claude", "allowed-domains"),
                          "x.example\n")
        mine = write_file(os.path.join(self.root, "mine"), "y.example\n")
        plan = self.plan("--filter-network", "--allow-file", mine, "--allow-domain", "z.example")
        self.assertEqual(plan.allow_files, [user_file, mine])
        self.assertEqual(plan.allow, [*CLAUDE.allow, "z.example"])
        with self.assertRaises(Failure):
            self.plan("--filter-network", "--allow-file", os.path.join(self.root, "nope"))


class PathRulesTest(unittest.TestCase):
    """The pure decisions behind the session tests below."""

    def setUp(self):
        self.root = temporary_root(self, "bw-paths-")
        self.project = os.path.join(self.root, "p")
        os.makedirs(os.path.join(self.project, "sub", "real"))
        os.symlink("../..", os.path.join(self.project, "sub", ".git"))
        self.roots = [(self.project, self.project)]

    def test_binds_below_a_writable_root_go_through_descriptors(self):
        real = os.path.join(self.project, "sub", "real")
        mounts, beneath = bw_lib.bind_checked(
            [("--ro-bind", real, real), ("--bind", self.project, self.project),
             ("--ro-bind", "/usr", "/usr"), ("--tmpfs", None, "/x")], self.roots)
        self.assertEqual(mounts, [("--ro-bind-fd", real, real),
                                  ("--bind", self.project, self.project),
                                  ("--ro-bind", "/usr", "/usr"), ("--tmpfs", None, "/x")])
        self.assertEqual(beneath, {real: (self.project, "sub/real", True)})

    def test_a_link_on_the_way_is_refused_by_name(self):
        link = os.path.join(self.project, "sub", ".git")
        self.assertEqual(bw_lib.planted_link(self.project, link + "/config"), link)
        with self.assertRaises(bw_lib.Failure) as caught:
            bw_lib.bind_checked([("--bind", link, link)], self.roots)
        self.assertIn(f"{link} is a symbolic link", str(caught.exception))
        with self.assertRaises(bw_lib.Failure):
            bw_lib.open_beneath(self.project, "sub/.git/config")
        self.assertIsNone(bw_lib.open_beneath(self.project, "sub/missing/config"))

    def test_a_program_linked_out_of_a_writable_root_is_refused(self):
        inside = os.path.join(self.project, "bin", "tool")
        bw_lib.check_chain([inside, os.path.join(self.project, "lib", "tool")], self.roots)
        bw_lib.check_chain(["/usr/bin/x", "/opt/x"], self.roots)
        with self.assertRaises(bw_lib.Failure):
            bw_lib.check_chain([inside, "/home/u/tools/tool"], self.roots)

    def test_host_files_must_be_our_regular_files(self):
        path = os.path.join(self.project, "log")
        self.assertIsNone(bw_lib.host_file_problem(path, self.roots))
        os.symlink(os.path.join(self.root, "elsewhere"), path)
        self.assertIn("symbolic link", bw_lib.host_file_problem(path, self.roots))
        self.assertIn("symbolic link", bw_lib.host_file_problem(
            os.path.join(self.project, "sub", ".git", "log"), self.roots))

    def test_log_names_hold_nothing_a_shell_expands(self):
        self.assertEqual(socks_filter.log_name("api.anthropic.com"), "api.anthropic.com")
        self.assertEqual(socks_filter.log_name("::1"), "::1")
        self.assertEqual(socks_filter.log_name("$(id)`x`"), "\\x24\\x28id\\x29\\x60x\\x60")
        record = socks_filter.shell_inert({"host": "a b;c", "detail": "x $(y) `z`", "port": 1})
        self.assertEqual(record["port"], 1)
        self.assertEqual(record["host"], "a\\x20b\\x3bc")
        self.assertNotIn("$", record["detail"])
        self.assertNotIn("`", record["detail"])


class PlacesTest(unittest.TestCase):
    def setUp(self):
        self.root = temporary_root(self, "bw-places-")

    def test_pure_decisions(self):
        place = os.path.join(self.root, "run")
        own = ("bw-locks.0", "bw-claude")
        self.assertEqual(bw_lib.place_shown(self.root, place, own), "above")
        self.assertEqual(bw_lib.place_shown(place, place, own), "above")
        for name in ("bw-locks.0", "bw-claude.ab12", ".bw-claude.ab12"):
            self.assertEqual(bw_lib.place_shown(f"{place}/{name}/x", place, own), "inside")
        self.assertIsNone(bw_lib.place_shown(f"{place}/project", place, own))
        self.assertEqual(bw_lib.place_shown(f"{place}/project", place, None), "inside")
        self.assertIsNone(bw_lib.place_shown(f"{self.root}/runner", place, own))

    def test_what_runs_on_the_host_is_never_writable_inside(self):
        # The interpreter's standard library runs with the wrapper (an agent's line appended
        # to shlex.py would run at the next start), and so does bwrap.
        stdlib = os.path.dirname(os.__file__)
        bwrap = os.path.join(self.root, "bin", "bwrap")
        for root, refused in ((stdlib, stdlib), (os.path.join(self.root, "bin"), bwrap)):
            with self.subTest(root=root), self.assertRaises(bw_lib.Failure) as caught:
                bw_lib.refuse_wrapper_inside([(root, root)], bwrap)
            self.assertIn(f"{refused} runs on the host", str(caught.exception))
        bw_lib.refuse_wrapper_inside([(os.path.join(self.root, "project"),) * 2], bwrap)


class ProtectionPlanTest(unittest.TestCase):
    def test_globs_name_what_glob_would_and_take_the_base_literally(self):
        for pattern in bw_lib.PROTECTED_GLOBS:
            name = pattern.rpartition("/")[2]
            self.assertEqual((name.count("*"), sum(pattern.count(c) for c in "?[]")), (1, 0))
        with tempfile.TemporaryDirectory() as tmp:
            base = os.path.join(tmp, "p[1]*")
            os.makedirs(os.path.join(base, ".claude", "settings.x.json", "inner"))
            for name in ("settings.json", "settingsjson", "settings.json.bak", ".settings.json",
                         "my-settings.json", "settings.local.json"):
                open(os.path.join(base, ".claude", name), "w").close()
            found = bw_lib.glob_paths(base, ".claude/settings*.json")
            self.assertEqual([os.path.basename(p) for p in found],
                             ["settings.json", "settings.local.json", "settings.x.json"])
            self.assertEqual(bw_lib.glob_paths(os.path.join(tmp, "none"), ".claude/s*.json"), [])

    def plan(self, existing, dirs=()):
        existing = set(existing) | set(dirs)
        return bw_lib.protection(
            "/p", "/h", ["/p", "/h/.claude"], exists=existing.__contains__,
            isdir=set(dirs).__contains__,
            glob=lambda base, pattern: sorted(
                e for e in existing if (base, pattern) == ("/p", ".claude/settings*.json")
                and e.startswith("/p/.claude/settings")))

    def test_existing_paths_are_read_only_and_their_parents_pinned(self):
        mounts, placeholders = self.plan(
            ["/p/.git/config", "/p/.git/hooks", "/p/.claude/settings.json",
             "/p/.claude/settings.old.json", "/p/.mcp.json"],
            dirs=["/p/.git", "/p/.claude", "/p/.claude/commands", "/p/.claude/agents",
                  "/p/.gemini", "/p/.vscode", "/p/.idea"])
        for path in ("/p/.git", "/p/.claude", "/p/.gemini"):
            self.assertIn(("--bind", path, path), mounts)
        for path in ("/p/.git/hooks", "/p/.git/config", "/p/.claude/settings.json",
                     "/p/.claude/settings.old.json", "/p/.mcp.json", "/p/.vscode"):
            self.assertIn(("--ro-bind", path, path), mounts)
        self.assertEqual(placeholders, [
            "/p/.git/commondir", "/p/.git/config.worktree", "/p/.git/modules/",
            "/p/.git/worktrees/", "/p/.claude/settings.local.json", "/p/.claude/hooks/",
            "/p/.claude/skills/", "/p/.gemini/settings.json", "/p/.gemini/.env",
            "/p/.gemini/commands/", "/p/.gemini/extensions/"])

    def test_missing_paths_get_placeholders_and_no_git_means_no_git_rules(self):
        mounts, placeholders = self.plan([])
        self.assertFalse([m for m in mounts if "/.git" in m[2]])
        self.assertEqual(placeholders, [
            "/p/.claude/", "/p/.claude/settings.json", "/p/.claude/settings.local.json",
            "/p/.claude/commands/", "/p/.claude/agents/", "/p/.claude/hooks/",
            "/p/.claude/skills/", "/p/.mcp.json", "/p/.gemini/", "/p/.gemini/settings.json",
            "/p/.gemini/.env", "/p/.gemini/commands/", "/p/.gemini/extensions/", "/p/.vscode/",
            "/p/.idea/"])
        # The CLI's state is the session's own copy (tests/test_state.py): nothing in it.
        self.assertFalse([m for m in mounts if m[2].startswith("/h/")])

    def test_another_clis_missing_config_directory_is_held_whole(self):
        mounts, placeholders = bw_lib.protection(
            "/p", "/h", ["/p", "/r", "/h/.claude"], extra=["/r"], whole=[".gemini"],
            exists={"/r/.gemini"}.__contains__, isdir={"/r/.gemini"}.__contains__,
            glob=lambda base, pattern: [])
        self.assertIn(("--ro-bind", "/p/.gemini", "/p/.gemini"), mounts)
        self.assertIn("/p/.gemini/", placeholders)
        self.assertFalse([p for p in placeholders if p.startswith("/p/.gemini/") and
                          p != "/p/.gemini/"])
        self.assertIn("/p/.claude/settings.json", placeholders)     # its own: path by path
        # Where it exists, each protected path in it is held as before.
        self.assertIn(("--bind", "/r/.gemini", "/r/.gemini"), mounts)
        self.assertIn("/r/.gemini/settings.json", placeholders)
        self.assertEqual(bw_lib.config_dirs(bw_lib.PROFILES["claude"]), {".claude"})
        self.assertEqual(bw_lib.config_dirs(bw_lib.PROFILES["gemini"]), {".gemini"})

    def test_git_file_and_allow_rw_directories_are_protected(self):
        existing = {"/p/.git", "/r/.git", "/r/.git/config"}
        mounts, placeholders = bw_lib.protection(
            "/p", "/h", ["/p", "/r", "/h/.claude"], extra=["/r"], exists=existing.__contains__,
            isdir={"/r/.git"}.__contains__, glob=lambda base, pattern: [])
        # A worktree's or submodule's .git file is read-only itself, and nothing below it.
        self.assertIn(("--ro-bind", "/p/.git", "/p/.git"), mounts)
        self.assertFalse([p for p in placeholders if p.startswith("/p/.git/")])
        # An --allow-rw directory gets the project's protection.
        for path in ("/r/.git/config", "/r/.git/hooks", "/r/.git/commondir", "/r/.git/modules",
                     "/r/.mcp.json", "/r/.claude/settings.json"):
            self.assertIn(("--ro-bind", path, path), mounts)
        self.assertIn(("--bind", "/r/.git", "/r/.git"), mounts)
        self.assertIn("/r/.git/commondir", placeholders)
        self.assertEqual(bw_lib.placeholder_content("/r/.git/commondir"), b".\n")


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
        allow = write_file(os.path.join(self.root, "allow"), "x.example\n")
        plan = self.plan("--filter-network", "--allow-domain", "127.0.0.1:8080",
                         "--allow-file", allow)
        args = bw_lib.build_proxy_args(plan, "/PRIV", 5)
        self.assertEqual(args[1:4], ["-I", "-S", bw_lib.FILTER_SCRIPT])
        self.assertEqual(args[4:6], ["--listen", "/PRIV/proxy.sock"])
        pairs = list(zip(args, args[1:]))
        for rule in (*CLAUDE.allow, "127.0.0.1:8080"):
            self.assertIn(f"--allow={rule}", args)
        self.assertIn("--allow=x.example", args)            # the file's rules, read once
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
        with contextlib.redirect_stdout(out), self.assertRaises(bw_lib.Finished) as finished:
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


def run_bpf(program, nr, arch, request):
    """Evaluate a seccomp program on one ioctl call, as the kernel would (the few opcodes
    bw_lib assembles)."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, 0, request, 0, 0, 0, 0)
    insns = [struct.unpack("=HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    for _ in range(len(insns)):
        code, jt, jf, k = insns[pc]
        if code == bw_lib.BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == bw_lib.BPF_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == bw_lib.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("program ran off its end")


class SeccompProgramTest(unittest.TestCase):
    ALLOW, EPERM = bw_lib.SECCOMP_RET_ALLOW, bw_lib.SECCOMP_RET_EPERM

    def test_x86_64(self):
        program = bw_lib.tiocsti_filter("x86_64")
        native, i386 = 0xC000003E, 0x40000003
        cases = [((16, native, 0x5412), self.EPERM), ((16, native, 0x541C), self.EPERM),
                 ((16, native, 0xFFFFFFFF00005412), self.EPERM),
                 ((0x40000000 | 514, native, 0x5412), self.EPERM), ((54, i386, 0x5412), self.EPERM),
                 ((16, native, 0x5413), self.ALLOW), ((16, native, 0x5401), self.ALLOW),
                 ((1, native, 0x5412), self.ALLOW), ((54, native, 0x5412), self.ALLOW),
                 ((16, i386, 0x5412), self.ALLOW), ((16, 0xC00000B7, 0x5412), self.ALLOW)]
        for call, expected in cases:
            with self.subTest(call=[hex(x) for x in call]):
                self.assertEqual(run_bpf(program, *call), expected)

    def test_aarch64(self):
        program = bw_lib.tiocsti_filter("aarch64")
        native, arm = 0xC00000B7, 0x40000028
        cases = [((29, native, 0x5412), self.EPERM), ((29, native, 0x100005412), self.EPERM),
                 ((29, native, 0x541C), self.EPERM), ((54, arm, 0x5412), self.EPERM),
                 ((29, native, 0x5410), self.ALLOW), ((16, native, 0x5412), self.ALLOW)]
        for call, expected in cases:
            with self.subTest(call=[hex(x) for x in call]):
                self.assertEqual(run_bpf(program, *call), expected)

    def test_unsupported_architecture_is_refused(self):
        with self.assertRaises(bw_lib.Failure) as caught:
            bw_lib.tiocsti_filter("riscv64")
        self.assertIn("riscv64", str(caught.exception))
        self.assertIn("x86_64 and aarch64", str(caught.exception))


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


class AllowFileRulesTest(unittest.TestCase):
    def setUp(self):
        self.root = temporary_root(self, "bw-allow-")

    def test_a_directory_or_a_missing_file_is_refused(self):
        for path, why in ((self.root, "a directory"),
                          (os.path.join(self.root, "nope"), "no such file")):
            with self.subTest(path=path):
                with self.assertRaises(Failure) as caught:
                    bw_lib.allow_file_rules(path, [])
                self.assertIn(why, str(caught.exception))
                self.assertEqual(caught.exception.code, 2)

    def test_rules_are_read_once_here(self):
        read_fd, write_fd = os.pipe()
        os.write(write_fd, b"a.example\n# c\n*.b.example:443  # d\n")
        os.close(write_fd)
        try:
            rules = bw_lib.allow_file_rules(f"/dev/fd/{read_fd}", [])
        finally:
            os.close(read_fd)
        self.assertEqual(rules, ["a.example", "*.b.example:443"])


class NodeVersionTest(unittest.TestCase):
    def test_versions(self):
        self.assertEqual(bw_lib.node_version("v20.20.2\n"), (20, 20))
        self.assertIsNone(bw_lib.node_version("node: not found"))
        cases = {(20, 20): (False, False), (22, 20): (False, False), (22, 21): (True, True),
                 (23, 11): (False, False), (24, 0): (True, False), (24, 5): (True, True),
                 (25, 0): (True, True)}
        for version, (fetch, http) in cases.items():
            with self.subTest(version=version):
                self.assertEqual(bw_lib.node_honours(version, bw_lib.NODE_FETCH_PROXY), fetch)
                self.assertEqual(bw_lib.node_honours(version, bw_lib.NODE_HTTP_PROXY), http)


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


class TerminalKeptTest(unittest.TestCase):
    def test_without_a_terminal_nothing_is_kept(self):
        self.assertIsNone(bw_lib.terminal_modes(io.StringIO()))
        with open(os.devnull) as devnull:
            self.assertIsNone(bw_lib.terminal_modes(devnull))

    def test_every_step_is_undone_even_when_one_fails(self):
        done = []

        def fail():
            done.append("fail")
            raise OSError("x")
        with self.assertRaises(OSError):
            bw_lib.undo_all([lambda: done.append(1), fail, lambda: done.append(3)])
        self.assertEqual(done, [3, "fail", 1])



if __name__ == "__main__":
    unittest.main()
