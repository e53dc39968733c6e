"""bw-claude and bw-gemini in real sandboxes: real bwrap, socat, curl and socks_filter.py, with a
fake CLI on PATH (a shell script that runs its last argument) and a temporary HOME holding
fixture secrets.  Upstreams listen on the host's loopback only."""

import fcntl
import http.server
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import bw_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BW_CLAUDE = os.path.join(REPO, "bw-claude")
BW_GEMINI = os.path.join(REPO, "bw-gemini")
IN_CI = os.environ.get("CI") == "true"

FAKE_CLI = """#!/bin/sh
# Fake CLI: record the arguments in the project, then run the last one as a script.
printf '%s\\n' "$@" > "$PWD/.fake-cli-args"
for script; do :; done
eval "$script"
"""

BODY = b"hello from the upstream\n"


class Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


def missing(reason):
    if IN_CI:
        raise AssertionError(reason)
    raise unittest.SkipTest(reason)


def require_sandbox(*tools):
    """Skip (fail under CI) unless bwrap and `tools` are installed and bwrap works here."""
    for tool in ("bwrap", *tools):
        if not shutil.which(tool):
            missing(f"{tool} is not installed")
    probe = subprocess.run(["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        missing(f"bwrap cannot create a sandbox here: {probe.stderr.strip()}")


def write_file(path, text, mode=0o644):
    """Write `text` to `path` (its directories made), with `mode`; returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def make_session_dirs(test, prefix):
    """Give `test` a temporary root with home/, bin/, project/ and run/ (test.home, .bin,
    .project, .runtime), removed after the test."""
    test.root = os.path.realpath(tempfile.mkdtemp(prefix=prefix))
    test.addCleanup(shutil.rmtree, test.root, True)
    for attribute, name in (("home", "home"), ("bin", "bin"), ("project", "project"),
                            ("runtime", "run")):
        setattr(test, attribute, os.path.join(test.root, name))
        os.makedirs(getattr(test, attribute), 0o700)


def read_pty(fd, rounds=600):
    """Read a pseudo-terminal until it closes (or `rounds` tenths of a second pass)."""
    output = b""
    for _ in range(rounds):
        if not select.select([fd], [], [], 0.1)[0]:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    return output


def one_line(text):
    return text.strip() and "\n" not in text.strip() and "Traceback" not in text


def wait_for(predicate, seconds=20):
    """Poll a condition, bounded; the caller asserts on the result."""
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def pid_namespace_members(namespace):
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == namespace:
                members.append(pid)
        except OSError:
            continue
    return members


def processes_mentioning(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


class SessionCase:
    """For test cases that run the wrapper in the directories make_session_dirs made."""

    def bw(self, *argv, script=None, tool=BW_CLAUDE, env=None, **kwargs):
        command = [sys.executable, tool, *argv] + (["--", script] if script is not None else [])
        kwargs = {"capture_output": True, **kwargs}
        return subprocess.run(command, cwd=self.project, env=env or self.env, text=True,
                              timeout=60, **kwargs)

    def check(self, result, code=0):
        self.assertEqual(result.returncode, code, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def assert_clean(self):
        """No private directory and no process of the session is left."""
        self.assertEqual(os.listdir(self.runtime), [])
        self.assertEqual(processes_mentioning(self.runtime), [])


class SandboxTest(SessionCase, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_sandbox("socat", "curl")
        if not os.path.exists(os.path.join(REPO, "socks_filter.py")):
            missing("socks_filter.py is not there yet")
        cls.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
        cls.port = cls.server.server_address[1]
        cls.thread = threading.Thread(target=cls.server.serve_forever, daemon=True)
        cls.thread.start()

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()

    def setUp(self):
        make_session_dirs(self, "bw-sandbox-")
        self.write(".ssh/id_rsa", "-----BEGIN FAKE PRIVATE KEY-----\n", 0o600)
        self.write(".aws/credentials", "[default]\naws_secret_access_key = fake\n")
        self.write(".config/gh/hosts.yml", "oauth_token: fake\n")
        self.write(".config/app/settings", "visible with --full-home-access\n")
        self.write(".local/bin/mytool", "#!/bin/sh\necho mytool ran\n", 0o755)
        self.write(".claude.json", '{"numStartups": 1}\n', 0o600)
        self.write("notes.txt", "notes\n")
        self.fake_cli("claude")
        self.env = {"HOME": self.home, "PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8",
                    "XDG_RUNTIME_DIR": self.runtime, "ANTHROPIC_API_KEY": "sk-fake",
                    "AWS_SECRET_ACCESS_KEY": "aws-fake"}

    def write(self, relative, text, mode=0o644):
        return write_file(os.path.join(self.home, relative), text, mode)

    def fake_cli(self, name):
        path = os.path.join(self.bin, name)
        with open(path, "w") as f:
            f.write(FAKE_CLI)
        os.chmod(path, 0o755)

    # -- the sandbox ----------------------------------------------------------------------

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
        self.write("dotfiles/ssh/id_ed25519", "-----BEGIN FAKE KEY-----\n", 0o600)
        os.rename(os.path.join(self.home, ".ssh"), os.path.join(self.home, "old-ssh"))
        os.symlink("dotfiles/ssh", os.path.join(self.home, ".ssh"))
        self.write(".gemini/oauth_creds.json", '{"refresh_token": "fake"}\n', 0o600)
        self.write(".claude/.credentials.json", '{"token": "fake"}\n', 0o600)
        self.write(".claude.json.backup", '{"primaryApiKey": "fake"}\n', 0o600)
        for secret in (".pgpass", ".bash_history", ".config/rclone/rclone.conf",
                       ".cache/huggingface/token", ".m2/settings.xml"):
            self.write(secret, "fake secret\n", 0o600)
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

    def test_claude_json_rename_reaches_the_host(self):
        self.check(self.bw(script=(
            "cd ~ && mkdir .claude.json.lock && "
            "printf '{\"numStartups\": 2}\\n' > .claude.json.tmp.$$.1 && "
            "mv .claude.json.tmp.$$.1 .claude.json && rmdir .claude.json.lock && "
            "echo done > ~/.claude/written")))
        with open(os.path.join(self.home, ".claude.json")) as f:
            self.assertEqual(json.load(f), {"numStartups": 2})
        # The rest of the CLI's state is the session's own (tests/test_state.py).
        self.assertFalse(os.path.lexists(os.path.join(self.home, ".claude", "written")))
        self.assertEqual(os.stat(os.path.join(self.home, ".claude.json")).st_mode & 0o777, 0o600)
        leftovers = [e for e in os.listdir(self.home) if e.startswith(".claude.json")]
        self.assertEqual(leftovers, [".claude.json"])

    def test_claude_json_keeps_a_change_made_on_the_host_meanwhile(self):
        go = os.path.join(self.project, "go")
        process = subprocess.Popen(
            [sys.executable, BW_CLAUDE, "--", (
                "touch started; i=0; while [ ! -e go ] && [ $i -lt 400 ]; do sleep 0.05; "
                "i=$((i+1)); done; cd ~ && "
                "printf '{\"numStartups\": 2, \"tipsHistory\": {\"a\": 1}}' > t && "
                "mv t .claude.json")],
            cwd=self.project, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(process.kill)
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.project, "started"))))
        self.write(".claude.json", '{"numStartups": 1, "host": "kept"}')
        open(go, "w").close()
        process.communicate(timeout=60)
        self.assertEqual(process.returncode, 0)
        with open(os.path.join(self.home, ".claude.json")) as f:
            self.assertEqual(json.load(f), {"numStartups": 2, "tipsHistory": {"a": 1},
                                            "host": "kept"})

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

    # -- networks ---------------------------------------------------------------------------

    def curl(self, url, options=""):
        """A curl command line for the sandbox's shell; `options` is shell text."""
        return f"curl -sS -m 10 {options} {url}"

    def test_unshare_net_leaves_no_route(self):
        upstream = f"http://127.0.0.1:{self.port}/"
        direct = "--noproxy '*' --connect-timeout 3"
        script = "; ".join([self.curl(upstream, direct), "echo loopback=$?",
                            self.curl("http://192.0.2.1/", direct), "echo remote=$?",
                            "tail -n +2 /proc/net/route | wc -l"])
        shared = self.check(self.bw(script=script)).stdout
        self.assertIn(BODY.decode(), shared)
        for flag in ("--unshare-net", "--no-network"):
            isolated = self.check(self.bw(flag, script=script)).stdout
            self.assertNotIn(BODY.decode(), isolated)
            self.assertIn("loopback=7", isolated)
            self.assertIn("remote=7", isolated)
            self.assertEqual(isolated.split()[-1], "0")

    def test_filter_network_enforced(self):
        log = os.path.join(self.root, "proxy.jsonl")
        upstream = f"http://127.0.0.1:{self.port}/"
        script = "; ".join([
            self.curl(upstream, "--noproxy ''"),
            self.curl(upstream, "--noproxy '' -x \"$ALL_PROXY\""),
            self.curl(upstream, "--noproxy '' -p -x \"$HTTPS_PROXY\""),
            self.curl("http://blocked.example/", "--noproxy '' -o /dev/null -w 'blocked=%{http_code}\\n'"),
            self.curl(upstream, "--noproxy '*'") + "; echo direct=$?",
            "echo $ALL_PROXY $NO_PROXY $NODE_USE_ENV_PROXY"])
        result = self.check(self.bw("--filter-network", "--unshare-net", "--allow-domain",
                                    f"127.0.0.1:{self.port}", "--proxy-log", log, script=script))
        self.assertEqual(result.stdout.count(BODY.decode()), 3)
        self.assertIn("blocked=403", result.stdout)
        self.assertIn("direct=7", result.stdout)
        proxy_vars = result.stdout.split()[-3:]
        self.assertRegex(proxy_vars[0], r"^socks5h://127\.0\.0\.1:\d+$")
        self.assertEqual(proxy_vars[1:], ["localhost,127.0.0.1,::1", "1"])
        with open(log) as f:
            decisions = [r for r in map(json.loads, f) if r["event"] == "decision"]
        self.assertEqual({(r["proto"], r["decision"]) for r in decisions if r["host"] == "127.0.0.1"},
                         {("http", "allow"), ("socks5", "allow"), ("http-connect", "allow")})
        blocked = [r for r in decisions if r["host"] == "blocked.example"]
        self.assertEqual([(r["decision"], r["reason"]) for r in blocked],
                         [("deny", "not-in-allowlist")])
        summary = result.stderr.strip().splitlines()[-1]
        self.assertIn("3 allowed, 1 blocked", summary)
        self.assertIn("--allow-domain blocked.example:80", summary)
        self.assert_clean()

    def test_filter_network_advisory(self):
        upstream = f"http://127.0.0.1:{self.port}/"
        result = self.check(self.bw("--filter-network", "--share-net", "--allow-domain", f"127.0.0.1:{self.port}",
                                    script=self.curl(upstream, "--noproxy ''")))
        self.assertIn("advisory", result.stderr)
        self.assertIn(BODY.decode(), result.stdout)
        self.assertIn("1 allowed, 0 blocked", result.stderr)
        self.assert_clean()

    def test_user_allow_file_is_read(self):
        self.write(".config/bw-claude/allowed-domains", f"# mine\n127.0.0.1:{self.port}\n")
        result = self.check(self.bw("--filter-network", "--unshare-net", script=self.curl(
            f"http://127.0.0.1:{self.port}/", "--noproxy ''")))
        self.assertIn(BODY.decode(), result.stdout)

    # -- lifecycle ---------------------------------------------------------------------------

    def start_long_session(self, *argv):
        script = ("readlink /proc/self/ns/pid > ns; i=0; while [ $i -lt 600 ]; do sleep 0.1; "
                  "i=$((i+1)); done")
        process = subprocess.Popen([sys.executable, BW_CLAUDE, *argv, "--", script],
                                   cwd=self.project, env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
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

    def test_ctrl_c_reaches_the_cli_and_not_the_sandbox(self):
        if not bw_lib.env_resets_signals(shutil.which("env") or "/usr/bin/env"):
            missing("env(1) lacks --default-signal (coreutils < 8.31)")
        # After Ctrl-C the network must still work: socat and the proxy are not the CLI.
        fetch = self.curl(f"http://127.0.0.1:{self.port}/", "--noproxy ''")
        script = (f"fetch() {{ {fetch}; }}; trap 'fetch; echo got-sigint; exit 5' INT; "
                  "touch started; i=0; "
                  "while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; echo no-sigint")
        pid, fd = pty.fork()
        if pid == 0:
            os.chdir(self.project)
            os.execve(sys.executable, [sys.executable, BW_CLAUDE, "--filter-network",
                                       "--unshare-net", "--allow-domain", f"127.0.0.1:{self.port}",
                                       "--", script], self.env)
        output = b""

        def drain(seconds):
            nonlocal output
            ready = select.select([fd], [], [], seconds)[0]
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    chunk = b""
                output += chunk
                return bool(chunk)
            return True

        started = os.path.join(self.project, "started")
        for _ in range(400):
            drain(0.05)
            if os.path.exists(started):
                break
        self.assertTrue(os.path.exists(started), output)
        os.write(fd, b"\x03")
        for _ in range(600):
            if not drain(0.1):
                break
        _, status = os.waitpid(pid, 0)
        os.close(fd)
        self.assertIn(b"got-sigint", output)
        self.assertIn(BODY, output.replace(b"\r\n", b"\n"))
        self.assertNotIn(b"no-sigint", output)
        self.assertEqual(os.waitstatus_to_exitcode(status), 5, output)
        self.assert_clean()

    def test_dry_run_starts_nothing(self):
        result = self.check(self.bw("--dry-run", "--filter-network", "--unshare-net", script="x"))
        proxy, bwrap = result.stdout.splitlines()
        self.assertIn("socks_filter.py --listen", proxy)
        self.assertIn("bwrap --die-with-parent", bwrap)
        self.assertNotIn("sk-fake", result.stdout)
        self.assertEqual(os.listdir(self.runtime), [])
        self.assertFalse(os.path.exists(os.path.join(self.home, ".claude")))
        self.assertFalse(os.path.exists(os.path.join(self.project, ".fake-cli-args")))

    # -- errors -----------------------------------------------------------------------------

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


if __name__ == "__main__":
    unittest.main()
