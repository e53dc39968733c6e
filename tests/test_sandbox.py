"""bw-claude and bw-gemini in real sandboxes: real bwrap, socat, curl and socks_filter.py,
with a fake CLI on PATH (a shell script that runs its last argument) and a temporary HOME
holding fixture secrets: what is visible and writable, the process inside, the session's
life and end, its home on disk, errors, the defaults file and --doctor.  Upstreams listen on
the host's loopback only."""

import fcntl
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import unittest

import bw_lib
from tests.sandbox_harness import (BODY, BW_CLAUDE, BW_GEMINI, LoopbackUpstreams, SessionCase,
                                   fetch, http_server, missing, one_line, pid_namespace_members,
                                   processes_mentioning, run_in_pty, wait_for)


class SandboxCase(SessionCase):
    """A home with secrets of many kinds, and API keys in the environment."""

    PREFIX = "bw-sandbox-"
    TOOLS = ("socat", "curl")

    def setUp(self):
        super().setUp()
        self.write_home(".ssh/id_rsa", "-----BEGIN FAKE PRIVATE KEY-----\n", 0o600)
        self.write_home(".aws/credentials", "[default]\naws_secret_access_key = fake\n")
        self.write_home(".config/gh/hosts.yml", "oauth_token: fake\n")
        self.write_home(".config/app/settings", "visible with --full-home-access\n")
        self.write_home(".local/bin/mytool", "#!/bin/sh\necho mytool ran\n", 0o755)
        self.write_home(".claude.json", '{"numStartups": 1}\n', 0o600)
        self.write_home("notes.txt", "notes\n")
        self.env.update(ANTHROPIC_API_KEY="sk-fake", AWS_SECRET_ACCESS_KEY="aws-fake")


class FilesystemTest(SandboxCase):
    """What the sandbox sees and may write."""

    def test_project_is_writable_and_home_writes_stay_inside(self):
        result = self.check(self.bw(script=(
            "echo made > made.txt && echo ok-project; "
            "echo x > ~/new-in-home && echo ok-session-home; "
            "echo x >> ~/.local/bin/mytool || echo tools-read-only; "
            "~/.local/bin/mytool; echo x > /usr/bin/bw-test 2>/dev/null || echo system-read-only")))
        for line in ("ok-project", "ok-session-home", "tools-read-only", "mytool ran",
                     "system-read-only"):
            self.assertIn(line, result.stdout)
        with open(os.path.join(self.project, "made.txt")) as f:
            self.assertEqual(f.read(), "made\n")
        self.assertFalse(os.path.exists(os.path.join(self.home, "new-in-home")))
        with open(os.path.join(self.home, ".local/bin/mytool")) as f:
            self.assertNotIn("x\n", f.read())
        self.assert_clean()

    def test_etc_files_are_the_hosts_read_only_and_only_those_listed(self):
        # /etc's files are copied in (bwrap --file), not bound: the same bytes, unwritable,
        # and nothing of /etc that ETC_ENTRIES does not name.
        shown = [p for p in ("/etc/passwd", "/etc/hosts", "/etc/os-release")
                 if os.path.isfile(p) and os.access(p, os.R_OK)]
        script = "; ".join(f"sha256sum {p}; echo x >> {p} 2>/dev/null && echo WROTE {p}"
                           for p in shown)
        script += "; ls /etc/shadow /etc/ssh 2>/dev/null; true"
        result = self.check(self.bw(script=script))
        for path in shown:
            with open(path, "rb") as f:
                self.assertIn(f"{hashlib.sha256(f.read()).hexdigest()}  {path}", result.stdout)
            self.assertNotIn(f"WROTE {path}", result.stdout)
        self.assertNotIn("/etc/shadow", result.stdout)
        self.assertNotIn("/etc/ssh", result.stdout)
        with open("/etc/passwd", "rb") as f:
            self.assertNotIn(b"\nx\n", f.read())      # the host's is untouched

    def test_secrets_are_invisible(self):
        script = ("for p in ~/.ssh ~/.ssh/id_rsa ~/.aws ~/.config/gh/hosts.yml ~/notes.txt; do "
                  "if [ -e $p ]; then echo visible $p; else echo hidden $p; fi; done; "
                  "cat ~/.config/app/settings 2>/dev/null; grep -rl fake ~ 2>/dev/null; true")
        default = self.check(self.bw(script=script)).stdout
        full = self.check(self.bw("--full-home-access", script=script)).stdout
        for output in (default, full):
            for secret in (".ssh", ".ssh/id_rsa", ".aws", ".config/gh/hosts.yml"):
                self.assertIn(f"hidden {self.home}/{secret}\n", output)
            self.assertNotIn("PRIVATE KEY", output)
            self.assertNotIn("oauth_token", output)
        self.assertIn(f"hidden {self.home}/notes.txt", default)
        self.assertIn(f"visible {self.home}/notes.txt", full)
        self.assertIn("visible with --full-home-access", full)
        self.assertNotIn("visible with --full-home-access", default)

    def test_full_home_is_read_only(self):
        result = self.check(self.bw("--full-home-access", script=(
            "echo x >> ~/notes.txt || echo notes-read-only; "
            "echo x > ~/.config/app/new || echo config-read-only")))
        self.assertIn("notes-read-only", result.stdout)
        self.assertIn("config-read-only", result.stdout)
        with open(os.path.join(self.home, "notes.txt")) as f:
            self.assertEqual(f.read(), "notes\n")

    def test_no_host_socket_is_reachable(self):
        listeners = []
        exposed = os.path.join(self.root, "exposed")
        os.makedirs(exposed)
        for path in (os.path.join(self.runtime, "agent.sock"), os.path.join(exposed, "x.sock")):
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(path)
            listener.listen()
            listeners.append(listener)
            self.addCleanup(listener.close)
        # -xtype, not -type: -type trusts readdir's file type, which for a bind-mounted
        # socket is the mount point's (a regular file); -xtype stats.
        find = ("find / -path /proc -prune -o -path /sys -prune -o -xtype s -print 2>/dev/null; "
                "ls -A /run 2>/dev/null; true")
        plain = self.check(self.bw(script=find)).stdout
        self.assertEqual(plain.strip(), "")
        filtered = self.check(self.bw("--filter-network", "--unshare-net", script=find)).stdout
        self.assertEqual(filtered.split(), ["/run/bw/proxy.sock", "bw"])
        # A socket below a directory shown on request is covered too; one named is shown.
        shown = self.check(self.bw("--allow-ro", exposed, script=find)).stdout
        self.assertEqual(shown.split(), [])
        named = os.path.join(exposed, "x.sock")
        shown = self.check(self.bw("--allow-ro", named, script=find)).stdout
        self.assertEqual(shown.split(), [named])
        for listener in listeners:
            os.unlink(listener.getsockname())
        self.assertEqual(os.listdir(self.runtime), [])

    def test_full_home_hides_linked_secrets_other_credentials_and_nested_sockets(self):
        # ~/.ssh as a dotfile manager's symlink; the other CLI's credentials; more secrets;
        # a socket deep in a shown directory.
        self.write_home("dotfiles/ssh/id_ed25519", "-----BEGIN FAKE KEY-----\n", 0o600)
        os.rename(os.path.join(self.home, ".ssh"), os.path.join(self.home, "old-ssh"))
        os.symlink("dotfiles/ssh", os.path.join(self.home, ".ssh"))
        self.write_home(".gemini/oauth_creds.json", '{"refresh_token": "fake"}\n', 0o600)
        self.write_home(".claude/.credentials.json", '{"token": "fake"}\n', 0o600)
        self.write_home(".claude.json.backup", '{"primaryApiKey": "fake"}\n', 0o600)
        for secret in (".pgpass", ".bash_history", ".config/rclone/rclone.conf",
                       ".cache/huggingface/token", ".m2/settings.xml"):
            self.write_home(secret, "fake secret\n", 0o600)
        deep = os.path.join(self.home, ".config", "app", "run")
        os.makedirs(deep)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(os.path.join(deep, "app.sock"))
        listener.listen()
        self.addCleanup(listener.close)
        self.fake_cli("gemini")
        script = ("grep -rhs 'fake' ~ | sort; find ~ -xtype s 2>/dev/null; "
                  "cat ~/.config/app/settings")
        claude = self.check(self.bw("--full-home-access", script=script)).stdout
        self.assertEqual(claude.splitlines(), ['{"token": "fake"}',
                                               "visible with --full-home-access"])
        if shutil.which("node", path=self.env["PATH"]):
            gemini = self.check(self.bw("--full-home-access", script=script,
                                        tool=BW_GEMINI)).stdout
            self.assertEqual(gemini.splitlines(), ['{"refresh_token": "fake"}',
                                                   "visible with --full-home-access"])
        result = self.bw("--allow-ro", os.path.join(self.home, "dotfiles", "ssh"), script="true")
        self.assertEqual(result.returncode, 1)
        self.assertIn("secrets (~/.ssh) are never shown", result.stderr)

    def test_a_cut_short_socket_search_is_said(self):
        tree = os.path.join(self.root, "tree")
        path = tree
        for level in range(bw_lib.SOCKET_WALK_DEPTH + 2):
            path = os.path.join(path, f"d{level}")
        os.makedirs(path)
        self.assertEqual(bw_lib.find_sockets([tree]), ([], False))
        result = self.check(self.bw("-v", "--dry-run", "--allow-ro", tree))
        self.assertIn("unix sockets, nested repositories: the search below the shown and "
                      "writable directories stopped", result.stderr)
        result = self.check(self.bw("-v", "--dry-run", "--allow-ro",
                                    os.path.join(tree, "d0", "d1", "d2")))
        self.assertNotIn("unix sockets", result.stderr)


class ProcessTest(SandboxCase):
    """The process inside: capabilities, environment, arguments, exit status."""

    def test_capabilities_are_dropped(self):
        result = self.check(self.bw(script="grep CapEff /proc/self/status; hostname"))
        self.assertIn("CapEff:\t0000000000000000", result.stdout)
        self.assertIn("bw-claude", result.stdout)

    def test_environment_is_rebuilt(self):
        result = self.check(self.bw("--env", "FOO=bar", "--env", "LANG=C", "--pass-env", "EXTRA",
                                    script="env | sort", env={**self.env, "EXTRA": "extra"}))
        lines = result.stdout.splitlines()
        for expected in ("FOO=bar", "LANG=C", "EXTRA=extra", "ANTHROPIC_API_KEY=sk-fake",
                         f"HOME={self.home}", "IS_SANDBOX=1"):
            self.assertIn(expected, lines)
        self.assertFalse([line for line in lines if line.startswith(("AWS_", "XDG_RUNTIME_DIR"))])

    def test_cli_arguments(self):
        self.check(self.bw("--resume", "abc", script="true"))
        with open(os.path.join(self.project, ".fake-cli-args")) as f:
            self.assertEqual(f.read().splitlines(),
                             ["--allow-dangerously-skip-permissions", "--resume", "abc", "true"])
        self.check(self.bw("--no-skip-permissions", script="true"))
        with open(os.path.join(self.project, ".fake-cli-args")) as f:
            self.assertEqual(f.read().splitlines(), ["true"])

    def test_shell(self):
        os.remove(os.path.join(self.bin, "claude"))
        result = self.check(self.bw("--shell", "--", "-c", "echo in-shell; pwd; exit 4"), code=4)
        self.assertEqual(result.stdout.split(), ["in-shell", self.project])

    def test_exit_status_passes_through(self):
        self.check(self.bw(script="exit 7"), code=7)
        self.check(self.bw("--filter-network", "--unshare-net", script="exit 9"), code=9)
        self.check(self.bw(script="kill -TERM $$"), code=128 + signal.SIGTERM)
        self.assert_clean()

    def test_gemini_profile(self):
        if not shutil.which("node", path=self.env["PATH"]):
            missing("node is not installed")
        self.fake_cli("gemini")
        self.env["GEMINI_API_KEY"] = "g-fake"
        result = self.check(self.bw(tool=BW_GEMINI, script=(
            "echo id > ~/.gemini/installation_id; echo $GEMINI_API_KEY; "
            "[ -e ~/.claude ] || echo no-claude-state; node -e 'console.log(1 + 1)'")))
        self.assertEqual(result.stdout.split(), ["g-fake", "no-claude-state", "2"])
        with open(os.path.join(self.home, ".gemini", "installation_id")) as f:
            self.assertEqual(f.read(), "id\n")
        with open(os.path.join(self.project, ".fake-cli-args")) as f:
            self.assertNotIn("--allow-dangerously-skip-permissions", f.read())

    def test_symlinked_entry_script(self):
        link = os.path.join(self.root, "elsewhere", "bw-claude")
        os.makedirs(os.path.dirname(link))
        os.symlink(BW_CLAUDE, link)
        result = self.check(self.bw("--filter-network", "--unshare-net", tool=link,
                                    script="echo via-link"))
        self.assertIn("via-link", result.stdout)

    def test_dry_run_starts_nothing(self):
        result = self.check(self.bw("--dry-run", "--filter-network", "--unshare-net", script="x"))
        proxy, bwrap = result.stdout.splitlines()
        self.assertIn("socks_filter.py --listen", proxy)
        self.assertIn("bwrap --die-with-parent", bwrap)
        self.assertNotIn("sk-fake", result.stdout)
        self.assertEqual(os.listdir(self.runtime), [])
        self.assertFalse(os.path.exists(os.path.join(self.home, ".claude")))
        self.assertFalse(os.path.exists(os.path.join(self.project, ".fake-cli-args")))


class LifecycleTest(SandboxCase):
    """Signals, Ctrl-C and Ctrl-\\ under a terminal, SIGKILL: nothing is left behind."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.port = http_server(cls.addClassCleanup).server_address[1]

    def start_long_session(self, *argv):
        script = ("readlink /proc/self/ns/pid > ns; i=0; while [ $i -lt 600 ]; do sleep 0.1; "
                  "i=$((i+1)); done")
        process = self.popen(*argv, "--", script)
        ns_file = os.path.join(self.project, "ns")
        self.assertTrue(wait_for(lambda: os.path.exists(ns_file) and os.path.getsize(ns_file)))
        with open(ns_file) as f:
            return process, f.read().strip()

    def test_sigterm_and_sighup_leave_nothing_behind(self):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with self.subTest(signal=sig):
                os.remove(os.path.join(self.project, "ns")) if os.path.exists(
                    os.path.join(self.project, "ns")) else None
                process, namespace = self.start_long_session("--filter-network", "--unshare-net")
                self.assertTrue(pid_namespace_members(namespace))
                self.assertTrue(processes_mentioning(self.runtime))
                process.send_signal(sig)
                _, stderr = process.communicate(timeout=30)
                self.assertEqual(process.returncode, 128 + sig)
                self.assertIn("bw-claude: network: 0 allowed, 0 blocked", stderr)
                self.assertTrue(wait_for(lambda: not pid_namespace_members(namespace)))
                self.assert_clean()

    def test_after_sigkill_everything_dies_and_the_next_run_sweeps_the_directory(self):
        process, namespace = self.start_long_session("--filter-network", "--unshare-net")
        live = os.path.join(self.runtime, "bw-claude.live")
        os.mkdir(live)
        holder = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, holder)
        fcntl.flock(holder, fcntl.LOCK_EX)
        process.kill()
        process.communicate(timeout=30)
        self.assertTrue(wait_for(lambda: not pid_namespace_members(namespace)))
        self.assertTrue(wait_for(lambda: not processes_mentioning(self.runtime)))
        # Its directory and the live one (the locks of the roots it protected stay too).
        self.assertEqual(len([n for n in os.listdir(self.runtime)
                              if not n.startswith("bw-locks")]), 2)
        self.check(self.bw(script="true"))
        self.assertEqual(os.listdir(self.runtime), ["bw-claude.live"])

    def test_a_session_killed_with_sigkill_is_swept_by_the_next(self):
        script = "touch ready; i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"
        process = self.popen("--filter-network", "--", script, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.project, "ready"))))
        process.kill()
        process.wait(30)
        self.assertEqual(len(os.listdir(self.base)), 1)
        self.assertTrue(wait_for(lambda: self.bw(script="true").returncode == 0 and
                                 not os.listdir(self.base), 30))
        self.assertTrue(wait_for(lambda: not os.listdir(self.runtime), 10))
        self.assert_all_gone()

    def test_ctrl_c_reaches_the_cli_and_not_the_sandbox(self):
        if not bw_lib.env_resets_signals(shutil.which("env") or "/usr/bin/env"):
            missing("env(1) lacks --default-signal (coreutils < 8.31)")
        # After Ctrl-C the network must still work: socat and the proxy are not the CLI.
        get = f"curl -sS -m 10 --noproxy '' http://127.0.0.1:{self.port}/"
        script = (f"fetch() {{ {get}; }}; trap 'fetch; echo got-sigint; exit 5' INT; "
                  "touch started; i=0; "
                  "while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; echo no-sigint")
        started = os.path.join(self.project, "started")
        output, status = run_in_pty(
            [sys.executable, BW_CLAUDE, "--filter-network", "--unshare-net", "--allow-domain",
             f"127.0.0.1:{self.port}", "--", script], self.project, self.env, started, b"\x03")
        self.assertTrue(os.path.exists(started), output)
        self.assertIn(b"got-sigint", output)
        self.assertIn(BODY, output.replace(b"\r\n", b"\n"))
        self.assertNotIn(b"no-sigint", output)
        self.assertEqual(status, 5, output)
        self.assert_clean()

    def test_ctrl_backslash_leaves_nothing_behind(self):
        if not bw_lib.env_resets_signals(shutil.which("env") or "/usr/bin/env"):
            missing("env(1) lacks --default-signal (coreutils < 8.31)")
        script = ("trap 'echo got-sigquit; exit 6' QUIT; touch started; i=0; "
                  "while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; echo no-sigquit")
        started = os.path.join(self.project, "started")
        output, status = run_in_pty([sys.executable, BW_CLAUDE, "--", script], self.project,
                                    self.env, started, b"\x1c")
        self.assertTrue(os.path.exists(started), output)
        self.assertIn(b"got-sigquit", output)
        self.assertEqual(status, 6, output)
        self.assertEqual(os.listdir(self.runtime), [])
        self.assertEqual(sorted(os.listdir(self.project)), [".fake-cli-args", "started"])


class SessionHomeTest(SessionCase):
    """The session's home and caches live on disk, below the sessions' base."""

    PREFIX = "bw-home-"
    TOOLS = ("socat",)

    def test_home_and_caches_live_on_disk_only_the_socket_in_the_runtime_dir(self):
        script = ("head -c 1048576 /dev/zero > ~/big; head -c 1048576 /dev/zero > "
                  "$XDG_CACHE_HOME/big; touch ready; i=0; while [ ! -e done ] && [ $i -lt 600 ]; "
                  "do sleep 0.1; i=$((i+1)); done")
        process = self.popen("--filter-network", "--unshare-net", "--", script)
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.project, "ready"))))
        info = os.lstat(self.base)
        self.assertTrue(stat.S_ISDIR(info.st_mode))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o700)
        [session] = os.listdir(self.base)
        self.assertEqual(os.path.getsize(os.path.join(self.base, session, "home", "big")), 1 << 20)
        self.assertEqual(os.path.getsize(os.path.join(self.base, session, "cache", "big")),
                         1 << 20)
        # Beside the socket's directory: the locks that keep placeholders across sessions.
        [socket_dir] = [e for e in os.listdir(self.runtime) if not e.startswith("bw-locks.")]
        self.assertEqual(os.listdir(os.path.join(self.runtime, socket_dir)), ["proxy.sock"])
        with open(os.path.join(self.project, "done"), "w"):
            pass
        self.assertEqual(process.wait(60), 0, process.stderr.read())
        process.stdout.close()
        process.stderr.close()
        self.assert_all_gone()

    def test_xdg_cache_home_is_honoured(self):
        cache = os.path.join(self.root, "xdg-cache")
        env = {**self.env, "XDG_CACHE_HOME": cache}
        result = self.check(self.bw(script="echo x > ~/f; ls -d " + cache + " 2>&1; true",
                                    env=env))
        self.assertIn("No such file", result.stdout, "the host's cache dir is not shown")
        self.assertEqual(os.listdir(os.path.join(cache, "bw-claude")), [])
        self.assertFalse(os.path.exists(self.base))


class ErrorsTest(SandboxCase):
    """Bad input: one line, the right status, nothing started or left."""

    def test_errors_are_one_line(self):
        no_cli = {**self.env, "PATH": "/usr/bin:/bin"}
        bad_file = os.path.join(self.root, "bad.allow")
        with open(bad_file, "w") as f:
            f.write("ok.example\n*.com\n")
        only_bwrap = os.path.join(self.root, "only-bwrap")
        os.makedirs(only_bwrap)
        os.symlink(shutil.which("bwrap"), os.path.join(only_bwrap, "bwrap"))
        shutil.copy(os.path.join(self.bin, "claude"), only_bwrap)
        cases = [
            ((), no_cli, 127, "claude not found"),
            (("--dir",), self.env, 2, "expected one argument"),
            (("--allow-ro", "/does/not/exist"), self.env, 1, "no such file"),
            (("--learn", "learned", "--no-network"), self.env, 2, "contradict"),
            (("--dir", self.home), self.env, 1, "home directory"),
            ((), {**self.env, "PATH": self.bin}, 127, "bwrap not found"),
            (("--filter-network",), {**self.env, "PATH": only_bwrap}, 127, "socat not found"),
            (("--filter-network", "--allow-domain", "bad rule!"), self.env, 2, "bad allow rule"),
            (("--filter-network", "--allow-domain", "*"), self.env, 2, "bad allow rule"),
            (("--filter-network", "--allow-domain", "*", "--dry-run"), self.env, 2,
             "bad allow rule"),
            (("--filter-network", "--allow-file", bad_file), self.env, 2,
             f"bad allow rule: {bad_file}:2: "),
        ]
        refused = os.path.join(self.root, "refused")
        os.makedirs(refused)
        with open(os.path.join(refused, "bwrap"), "w") as f:
            f.write("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
        os.chmod(os.path.join(refused, "bwrap"), 0o755)
        result = self.bw(script="echo ran", env={**self.env, "PATH": f"{refused}:{self.env['PATH']}"})
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.splitlines()[0], "bwrap: setting up uid map: Permission denied")
        self.assertIn("bw-claude: error: bwrap could not set up the sandbox", result.stderr.splitlines()[1])
        self.assertIn("apparmor", result.stderr)
        self.assert_clean()
        for argv, env, code, needle in cases:
            with self.subTest(argv=argv, needle=needle):
                result = self.bw(*argv, script="echo ran", env=env)
                self.assertEqual(result.returncode, code, result.stderr)
                self.assertTrue(one_line(result.stderr), result.stderr)
                self.assertIn(needle, result.stderr)
                self.assertTrue(result.stderr.startswith("bw-claude: error: "), result.stderr)
                self.assertNotIn("ran", result.stdout)
                self.assert_clean()

    def test_a_bad_defaults_file_is_one_line(self):
        path = self.write_home(".config/bw-claude/options", "--filter-network\n--filter-netwrok\n")
        result = self.bw(script="echo ran")
        self.assertEqual(result.returncode, 2)
        self.assertTrue(one_line(result.stderr), result.stderr)
        self.assertIn(f"bw-claude: error: {path}:2: --filter-netwrok is not a bw-claude option",
                      result.stderr)
        self.assertNotIn("ran", result.stdout)

    def test_a_typo_starts_nothing(self):
        result = self.bw("--filter-netwrok", "--unshare-net", script="echo ran")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertTrue(one_line(result.stderr), result.stderr)
        self.assertIn("did you mean --filter-network?", result.stderr)
        self.assertNotIn("ran", result.stdout)
        self.assertFalse(os.path.exists(os.path.join(self.project, ".fake-cli-args")))
        self.assert_all_gone()


class DefaultsAndDoctorTest(LoopbackUpstreams, SessionCase):
    PREFIX = "bw-daily-"
    TOOLS = ("socat", "curl")

    def test_defaults_file_is_applied_and_can_be_overridden(self):
        self.write_home(".config/bw-claude/options", "# mine\n--filter-network --unshare-net\n"
                                     f"--allow-domain {self.one}   # the upstream\n")
        direct = fetch(self.one, "--noproxy '*' --connect-timeout 3", "direct")
        result = self.check(self.bw(script=f"{fetch(self.one)}; {direct}; exit 0"))
        self.assertEqual(result.stdout.count(BODY.decode()), 1)
        self.assertIn("code=200", result.stdout.split())
        self.assertIn("direct=000", result.stdout.split())
        self.assertIn("bw-claude: network: 1 allowed, 0 blocked", result.stderr)

        result = self.check(self.bw("--no-filter-network", "--share-net", script=direct))
        self.assertIn("direct=200", result.stdout.split())
        self.assertNotIn("network:", result.stderr)

        dry = self.check(self.bw("--dry-run")).stdout
        self.assertIn(f"--allow={self.one}", dry)
        self.assertIn("--unshare-net", dry)
        dry = self.check(self.bw("--dry-run", "--no-defaults")).stdout
        self.assertNotIn("socks_filter", dry)
        self.assertNotIn("--unshare-net", dry)
        self.assert_clean()

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

        path = self.write_home(".config/bw-claude/allowed-domains", "# mine\nok.example:443\n*.github.io\n")
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



if __name__ == "__main__":
    unittest.main()
