"""Issue 11 parts 1, 2 and 5: nothing a sandboxed session writes may steer the host side.

Each attack is made the way the agent would make it, through the real `bw-claude --shell`
(a link planted in session 1, used by session 2; sessions of one project overlapping and
ending in every order, some with SIGKILL; a log turned into a link), and each test checks
the HOST side: was a secret readable, did a host file change, did a shell reading the log
run anything."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import unittest

import bw_lib
import socks_filter
from tests.test_sandbox import (BW_CLAUDE, SessionCase, make_session_dirs, missing,
                                require_sandbox, wait_for, write_file)

SECRET = "-----BEGIN FAKE ED25519 KEY----- 7f3c9e"
BASHRC = "# the user's bashrc\n"
FAKE_CLI = "#!/bin/sh\nfor script; do :; done\neval \"$script\"\n"


def connect_script(host):
    """Inside the sandbox: ask the proxy (through the bridge, SOCKS5 with a domain name, which
    may hold any byte) for `host`, as any client could."""
    assert "'" not in host and len(host) < 256
    return ("p=${HTTP_PROXY##*:}; p=${p%/}; exec 3<>/dev/tcp/127.0.0.1/$p; "
            "printf '\\005\\001\\000' >&3; head -c 2 <&3 >/dev/null; "
            f"printf '\\005\\001\\000\\003\\{len(host):03o}%s\\001\\273' '{host}' >&3; "
            "timeout 5 cat <&3 >/dev/null; true")


class PathRulesTest(unittest.TestCase):
    """The pure decisions behind the session tests below."""

    def setUp(self):
        self.root = os.path.realpath(tempfile.mkdtemp(prefix="bw-paths-"))
        self.addCleanup(shutil.rmtree, self.root, True)
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


class ContainmentCase(SessionCase):
    def setUp(self):
        require_sandbox()
        make_session_dirs(self, "bw-containment-")
        for relative, text, mode in ((".ssh/id_ed25519", SECRET + "\n", 0o600),
                                     (".netrc", f"machine x password {SECRET}\n", 0o600),
                                     (".bashrc", BASHRC, 0o644)):
            self.write_home(relative, text, mode)
        claude = os.path.join(self.bin, "claude")
        with open(claude, "w") as f:
            f.write(FAKE_CLI)
        os.chmod(claude, 0o755)
        self.home_before = set(os.listdir(self.home))
        self.env = {"HOME": self.home, "PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8",
                    "XDG_RUNTIME_DIR": self.runtime}

    def write_home(self, relative, text, mode=0o644):
        write_file(os.path.join(self.home, relative), text, mode)

    def shell(self, script, *argv):
        """The agent's command, run as `bw-claude --shell -- -c SCRIPT`."""
        return self.bw("--shell", *argv, "--", "-c", script)

    def read(self, path):
        try:
            with open(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def assert_home_untouched(self, result):
        self.assertNotIn(SECRET, result.stdout + result.stderr)
        self.assertEqual(self.read(os.path.join(self.home, ".bashrc")), BASHRC)
        # ~/.cache holds only the sessions' base, empty once they ended.
        self.assertEqual(set(os.listdir(self.home)) - {".claude", ".cache"},
                         self.home_before - {".claude", ".cache"})
        self.assertEqual(os.listdir(os.path.join(self.home, ".cache", "bw-claude")), [])
        self.assertEqual(os.listdir(os.path.join(self.home, ".ssh")), ["id_ed25519"])

    def assert_refused_naming(self, result, path):
        """The session did not start: one line naming the link and how to remove it."""
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertNotIn("SESSION-RAN", result.stdout)
        line = result.stderr.strip()
        self.assertNotIn("\n", line)
        self.assertIn(path, line)
        self.assertIn("symbolic link", line)
        self.assertIn("rm ", line)


class PlantedLinkTest(ContainmentCase, unittest.TestCase):
    """Part 1: a link planted in session 1 is never followed by session 2's mounts."""

    ATTACK = ("echo SESSION-RAN; cat {at}/.ssh/id_ed25519 {at}/.netrc 2>/dev/null; "
              "echo 'echo PWNED' >> {at}/.bashrc 2>/dev/null; "
              "mkdir -p {at}/.config/autostart 2>/dev/null; true")

    def test_a_nested_repository_linked_to_the_home_is_refused(self):
        # sub/.git -> the home: the next session took sub for a repository and bound its
        # .git, the whole home, read-write.  (A guarded session's own .git link is set
        # aside at its end, test_git_guard; one made without the guard stays.)
        self.check(self.shell("mkdir sub && ln -s ../../home sub/.git", "--allow-config-writes"))
        result = self.shell(self.ATTACK.format(at="sub/.git"))
        self.assert_home_untouched(result)
        self.assertFalse(os.path.exists(os.path.join(self.home, ".config")))
        self.assert_refused_naming(result, os.path.join(self.project, "sub", ".git"))
        # The way out the message gives works.
        os.unlink(os.path.join(self.project, "sub", ".git"))
        self.check(self.shell("echo SESSION-RAN"))

    def test_a_nested_repository_linked_outside_is_refused(self):
        # The reviewer's /tmp variant: any host directory, bound read-write.
        outside = os.path.join(self.root, "outside")
        os.mkdir(outside)
        self.check(self.shell("mkdir -p a/b && ln -s ../../../outside a/b/.git",
                              "--allow-config-writes"))
        result = self.shell("echo SESSION-RAN; echo x > a/b/.git/planted")
        self.assertEqual(os.listdir(outside), [])
        self.assert_refused_naming(result, os.path.join(self.project, "a", "b", ".git"))

    def test_a_protected_settings_file_linked_to_a_secret_is_refused(self):
        # .claude/settings*.json are protected by a glob: a link matching it was bound
        # read-only by following it, showing the secret it names.
        self.check(self.shell("ln -s ../../home/.netrc .claude/settings.evil.json"))
        result = self.shell("echo SESSION-RAN; cat .claude/settings.evil.json")
        self.assert_home_untouched(result)
        self.assert_refused_naming(result, os.path.join(self.project, ".claude",
                                                        "settings.evil.json"))

    def test_a_state_script_linked_to_a_secret_shows_nothing(self):
        # ~/.claude/statusline.sh -> ../.netrc: the home glob bound the secret.  (The CLI's
        # state is reworked elsewhere; what must hold is that the secret is never shown.)
        self.check(self.shell("ln -s ../.netrc ~/.claude/statusline.sh; ln -s ../.. ~/.claude/a.sh"))
        result = self.shell("echo SESSION-RAN; cat ~/.claude/statusline.sh ~/.claude/a.sh/*/.netrc "
                            "~/.claude/a.sh/*/.ssh/id_ed25519 2>/dev/null; true")
        self.assert_home_untouched(result)

    def test_an_allow_rw_directory_through_a_planted_link_is_refused(self):
        self.write_home("docs/private.txt", SECRET + "\n")
        self.home_before = set(os.listdir(self.home))
        self.check(self.shell("ln -s ../home/docs keys"))
        result = self.bw("--shell", "--allow-rw", os.path.join(self.project, "keys"), "--",
                         "-c", "echo SESSION-RAN; cat keys/private.txt")
        self.assert_home_untouched(result)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertNotIn("SESSION-RAN", result.stdout)

    def test_a_cli_linked_out_of_the_project_shows_nothing_more(self):
        # The CLI found on PATH inside the project (node_modules/.bin on PATH): its links,
        # which the sandbox can rewrite, decided what the next session showed read-only.
        self.write_home("tools/run", FAKE_CLI, 0o755)
        self.write_home("tools/" + ".netrc-copy", SECRET + "\n", 0o600)
        os.unlink(os.path.join(self.bin, "claude"))
        bin_dir = os.path.join(self.project, "node_modules", ".bin")
        os.makedirs(bin_dir)
        os.symlink("../../../home/tools/run", os.path.join(bin_dir, "claude"))
        env = dict(self.env, PATH=f"{bin_dir}:/usr/bin:/bin")
        result = self.bw("--", "cat ~/tools/.netrc-copy", env=env)
        self.assertNotIn(SECRET, result.stdout + result.stderr)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("symbolic link", result.stderr)

    def test_dry_run_shows_descriptor_binds(self):
        os.mkdir(os.path.join(self.project, ".git"))
        result = self.check(self.bw("--dry-run", "--shell"))
        self.assertIn(f"--ro-bind-fd FD {self.project}/.git/config", result.stdout)
        self.assertIn(f"--bind-fd FD {self.project}/.git", result.stdout)
        self.assertEqual(sorted(os.listdir(self.project)), [".git"])


class ConcurrentSessionsTest(ContainmentCase, unittest.TestCase):
    """Part 2: sessions of one project keep their protection whatever the others do."""

    # Each session waits for .go-NAME, then tries what the reviewer did once the first
    # session had ended, and writes the outcome to .result-NAME; .end-NAME ends it.
    SESSION = (": > .started-{n}; i=0; "
               "while [ ! -e .go-{n} ] && [ ! -e .end-{n} ] && [ $i -lt 1200 ]; do "
               "sleep 0.05; i=$((i+1)); done; "
               "if [ -e .go-{n} ]; then {{ "
               "echo '{{\"hooks\": 1}}' > .claude/settings.json && echo WROTE-settings; "
               "echo '{{\"mcpServers\": 1}}' > .mcp.json && echo WROTE-mcp; "
               "echo /tmp > .git/commondir && echo WROTE-commondir; "
               "printf '[core]\\n\\tfsmonitor = x\\n' >> .git/config && echo WROTE-config; "
               "echo tried; }} > .result-{n} 2>/dev/null; fi; "
               "while [ ! -e .end-{n} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done")

    def setUp(self):
        super().setUp()
        if not shutil.which("git"):
            missing("git is not installed")
        subprocess.run(["git", "init", "-q", self.project], check=True)
        self.git_config = self.read(os.path.join(self.project, ".git", "config"))
        self.sessions = {}

    def forget_markers(self):
        for name in os.listdir(self.project):
            if name.startswith((".started-", ".go-", ".end-", ".result-")):
                os.unlink(os.path.join(self.project, name))

    def start(self, name):
        process = subprocess.Popen([sys.executable, BW_CLAUDE, "--shell", "--", "-c",
                                    self.SESSION.format(n=name)], cwd=self.project, env=self.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        self.sessions[name] = process
        self.assertTrue(wait_for(lambda: os.path.exists(self.marker("started", name)),
                                 seconds=30), self.output(name))

    def marker(self, kind, name):
        return os.path.join(self.project, f".{kind}-{name}")

    def output(self, name):
        process = self.sessions[name]
        return "" if process.poll() is None else "".join(process.communicate(timeout=30))

    def end(self, name, how):
        process = self.sessions[name]
        if how == "kill":
            process.kill()
        else:
            open(self.marker("end", name), "w").close()
        process.communicate(timeout=30)
        self.assertEqual(process.returncode, -signal.SIGKILL if how == "kill" else 0)

    def attack_from(self, name):
        """The survivor tries to write what runs code later; nothing may change on the host."""
        open(self.marker("go", name), "w").close()
        result = self.marker("result", name)
        self.assertTrue(wait_for(lambda: "tried" in (self.read(result) or ""), seconds=30))
        self.assertNotIn("WROTE", self.read(result))
        self.assert_project_unchanged()

    def assert_project_unchanged(self):
        for relative in (".claude/settings.json", ".mcp.json", ".git/commondir"):
            self.assertIn(self.read(os.path.join(self.project, relative)),
                          (None, "{}\n", ".\n", ""), relative)
        self.assertEqual(self.read(os.path.join(self.project, ".git", "config")), self.git_config)

    def assert_all_gone(self):
        """After the last session: no placeholder, no lock left on the host."""
        names = {n for n in os.listdir(self.project) if not n.startswith((".started-", ".go-",
                                                                            ".end-", ".result-"))}
        self.assertEqual(names, {".git"})
        self.assertFalse(os.path.exists(os.path.join(self.project, ".git", "commondir")))
        self.assertEqual(self.read(os.path.join(self.project, ".git", "config")), self.git_config)
        self.assertFalse([n for n in os.listdir(self.runtime) if n.startswith("bw-locks")])

    def test_two_sessions_ending_in_every_way(self):
        for how in ("normal", "kill"):
            with self.subTest(first_ends=how):
                self.forget_markers()
                self.start("a")
                self.start("b")
                self.end("a", how)
                # A session starting and ending meanwhile (the sweep after a SIGKILL).
                self.check(self.shell("true"))
                self.attack_from("b")
                self.end("b", "normal")
                self.assert_all_gone()

    def test_a_session_starting_while_another_ends_keeps_its_protection(self):
        # The end is timed to land before, during and after b's own start.
        for delay in (0, 0.05, 0.1, 0.15, 0.2, 0.3):
            with self.subTest(delay=delay):
                self.forget_markers()
                self.start("a")
                threading.Timer(delay, open, (self.marker("end", "a"), "w")).start()
                self.start("b")
                self.sessions["a"].communicate(timeout=30)
                self.attack_from("b")
                self.end("b", "normal")
                self.assert_all_gone()

    def test_what_a_killed_session_held_goes_at_the_next_start_in_any_project(self):
        self.start("a")
        self.end("a", "kill")
        self.assertTrue(os.path.exists(os.path.join(self.project, ".mcp.json")))
        other = os.path.join(self.root, "other")
        os.mkdir(other)
        self.check(self.bw("--shell", "--dir", other, "--", "-c", "true"))
        self.assert_all_gone()
        self.assertEqual(os.listdir(other), [])

    def test_three_sessions_ending_in_every_order(self):
        orders = [(("a", "normal"), ("b", "normal"), "c"), (("c", "kill"), ("a", "normal"), "b"),
                  (("b", "normal"), ("c", "kill"), "a"), (("a", "kill"), ("b", "kill"), "c")]
        for first, second, survivor in orders:
            with self.subTest(first=first, second=second):
                self.forget_markers()
                for name in "abc":
                    self.start(name)
                self.end(*first)
                self.assert_project_unchanged()
                self.end(*second)
                self.attack_from(survivor)
                self.end(survivor, "kill" if first[1] == second[1] == "kill" else "normal")
                if first[1] == second[1] == "kill":
                    self.check(self.shell("true"))     # the next start cleans after SIGKILL
                self.assert_all_gone()


class HostWrittenFilesTest(ContainmentCase, unittest.TestCase):
    """Part 5: files the wrapper and the proxy write on the host follow no planted link,
    and the log holds nothing a shell would run."""

    def setUp(self):
        super().setUp()
        require_sandbox("socat")

    def test_a_proxy_log_turned_into_a_link_is_not_written_through(self):
        log = os.path.join(self.project, "proxy.jsonl")
        self.check(self.shell("rm -f proxy.jsonl; ln -s ../home/.bashrc proxy.jsonl",
                              "--filter-network", "--unshare-net", "--proxy-log", log))
        result = self.shell("echo SESSION-RAN; " + connect_script("$(echo PWNED)"),
                            "--filter-network", "--unshare-net", "--proxy-log", log)
        self.assertEqual(self.read(os.path.join(self.home, ".bashrc")), BASHRC)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertNotIn("SESSION-RAN", result.stdout)
        self.assertIn("--proxy-log", result.stderr)
        self.assertIn("symbolic link", result.stderr)

    def test_names_in_the_log_are_no_shell_code(self):
        log = os.path.join(self.root, "proxy.jsonl")
        marker = os.path.join(self.root, "ran")
        self.check(self.shell(connect_script(f"$(touch${{IFS}}{marker})"), "--filter-network", "--unshare-net", "--proxy-log", log))
        with open(log) as f:
            lines = f.read().splitlines()
        records = [json.loads(line) for line in lines]     # still valid JSON
        self.assertTrue(any("touch" in str(r.get("host")) for r in records), records)
        for line in lines:
            self.assertNotIn("$", line)
            self.assertNotIn("`", line)
        # What the reviewer's planted link made of it: the log read by a shell.
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run(["bash", "--norc", "--noprofile", log], cwd=scratch,
                           capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
        self.assertFalse(os.path.exists(marker))

    def test_settings_written_back_never_follow_a_planted_link(self):
        # Session 1 (protection off) leaves ~/.claude/settings.json -> ~/.bashrc; session 2
        # changes a key that goes back: the merge was written over what the link named.
        self.check(self.shell("ln -sf ../.bashrc ~/.claude/settings.json",
                              "--allow-config-writes"))
        result = self.shell("echo '{\"model\": \"opus\"}' > ~/.claude/settings.json")
        self.assertEqual(self.read(os.path.join(self.home, ".bashrc")), BASHRC)
        self.assertTrue(os.path.islink(os.path.join(self.home, ".claude", "settings.json")))
        self.assertIn("symbolic link", result.stderr)

    def test_a_learn_file_turned_into_a_link_is_not_replaced(self):
        learn = os.path.join(self.project, "learned")
        self.check(self.shell("ln -s ../home/.bashrc learned"))
        result = self.shell("echo SESSION-RAN", "--learn", learn)
        self.assertEqual(self.read(os.path.join(self.home, ".bashrc")), BASHRC)
        self.assertTrue(os.path.islink(learn))
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("symbolic link", result.stderr)


if __name__ == "__main__":
    unittest.main()
