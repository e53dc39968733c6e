"""End-to-end tests with the real Claude Code and Gemini CLI.

The CLIs run inside `bw-claude` / `bw-gemini --filter-network --unshare-net`, reach the host only
through socat and socks_filter.py, and talk to the fake APIs of tests/fake_apis.py.

The CLIs are found through PATH, as a user's shell finds them: the tests put
"$BW_TEST_CLI_DIR/node_modules/.bin" (default ~/.cache/bw-claude-test-clis) first on the PATH
they give the wrapper, so the wrapper's own lookup is what is tested.  Install them with
    npm install --prefix ~/.cache/bw-claude-test-clis @anthropic-ai/claude-code @google/gemini-cli
A missing CLI or tool skips locally and fails under CI=true.

What makes a CLI talk to the fake (measured with Claude Code 2.1.197 and Gemini CLI 0.61.0):
* The fake listens on 127.0.0.2, not 127.0.0.1: the sandbox's NO_PROXY=localhost,127.0.0.1,::1
  would send a request for 127.0.0.1 to the sandbox's own loopback, around the proxy.  Linux
  routes all of 127.0.0.0/8 to lo, so 127.0.0.2 is the host's loopback, and reached only
  through the proxy, which allows it only by an IP rule (--allow-domain 127.0.0.2:PORT).
* Claude: ANTHROPIC_BASE_URL=http://127.0.0.2:PORT, ANTHROPIC_API_KEY=dummy.  It sends an
  absolute-form `POST http://127.0.0.2:PORT/v1/messages?beta=true` to HTTP_PROXY (proto "http").
* Gemini: GOOGLE_GEMINI_BASE_URL=http://127.0.0.2:PORT, GEMINI_API_KEY=dummy.  It tunnels even
  plain http:// through `CONNECT 127.0.0.2:PORT` (proto "http-connect").  With
  GOOGLE_GEMINI_BASE_URL set, Gemini CLI 0.61 picks the auth type "gateway" and then refuses it
  ("Invalid auth method selected.", exit 41) unless ~/.gemini/settings.json selects
  security.auth.selectedType "gemini-api-key".  Its workspace trust is given the way its own
  message tells a user to: `--skip-trust`.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import unittest
import uuid

import bw_lib
from tests.fake_apis import FakeAPIServer
from tests.sandbox_harness import (REPO, decisions, make_session_dirs, missing,
                                   processes_mentioning, read_log)

CLI_DIR = os.environ.get("BW_TEST_CLI_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "bw-claude-test-clis")
CLI_BIN = os.path.join(CLI_DIR, "node_modules", ".bin")
INSTALL = (f'npm install --prefix "{CLI_DIR}" --no-audit --no-fund '
           "@anthropic-ai/claude-code @google/gemini-cli")

RUN_SECONDS = 90          # a whole -p run, proxy start to summary
LOG_SECONDS = 60          # waiting for a record in the proxy log
SCREEN_SECONDS = 45       # waiting for something on the interactive screen
EXIT_SECONDS = 30         # waiting for the wrapper to end after the CLI was told to quit
KEY = "dummy"

API_HOSTS = {"claude": "api.anthropic.com", "gemini": "generativelanguage.googleapis.com"}
# Gemini CLI's usage statistics (Clearcut); not in the default allow list, so denied.
GEMINI_TELEMETRY = "play.googleapis.com"


class RealCLITest(unittest.TestCase):
    """Common set-up: a temporary HOME and project, the fake APIs, the wrapper's private dir."""

    def need(self, ok, what, how):
        if ok:
            return
        missing(f"{what} is missing; install it: {how}")

    def need_cli(self, name):
        self.need(os.access(os.path.join(CLI_BIN, name), os.X_OK),
                  f"{name} ({os.path.join(CLI_BIN, name)})", INSTALL)
        if name == "gemini":
            self.need(shutil.which("node"), "node (>= 20, for Gemini CLI)", "apt-get install nodejs")

    def setUp(self):
        for tool, package in (("bwrap", "bubblewrap"), ("socat", "socat")):
            self.need(shutil.which(tool), tool, f"apt-get install {package}")
        # XDG_RUNTIME_DIR is unset and TMPDIR is run/: the wrapper's private directory (the
        # proxy socket) goes there, so the test can check that it is removed.
        make_session_dirs(self, "bw-e2e-")
        self.proxy_log = os.path.join(self.root, "proxy.jsonl")
        self.answer = f"BWFAKE {uuid.uuid4().hex[:12]} canned answer"
        self.fake = FakeAPIServer(answer=self.answer).start()
        self.addCleanup(self.fake.stop)

    # -- environment and commands --

    def env(self, **extra):
        """The host environment the wrapper gets: nothing of the caller's (no real keys)."""
        env = {"PATH": CLI_BIN + os.pathsep + os.environ.get("PATH", os.defpath),
               "HOME": self.home, "LANG": "C.UTF-8", "TMPDIR": self.runtime,
               "ANTHROPIC_API_KEY": KEY, "GEMINI_API_KEY": KEY}
        env.update(extra)
        return env

    def wrapper(self, cli, *args, fake=True, allow=True, log=True):
        argv = [sys.executable, os.path.join(REPO, "bw-" + cli), "--filter-network", "--unshare-net"]
        if fake:
            var = "ANTHROPIC_BASE_URL" if cli == "claude" else "GOOGLE_GEMINI_BASE_URL"
            argv += ["--env", f"{var}={self.fake.url}"]
        if allow:
            argv += ["--allow-domain", self.fake.hostport]
        if log:
            argv += ["--proxy-log", self.proxy_log]
        return argv + list(args)

    def seed_gemini_settings(self):
        os.makedirs(os.path.join(self.home, ".gemini"), exist_ok=True)
        with open(os.path.join(self.home, ".gemini", "settings.json"), "w") as f:
            json.dump({"security": {"auth": {"selectedType": "gemini-api-key"}}}, f)

    def run_wrapper(self, argv, timeout=RUN_SECONDS, env=None):
        proc = subprocess.Popen(argv, cwd=self.project, env=env or self.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.end_group(proc)
            out, err = proc.communicate()
            self.fail(f"{shlex.join(argv)} did not end within {timeout} s\nstdout: {out}\nstderr: {err}")
        return proc.returncode, out, err

    def end_group(self, proc):
        """SIGTERM, then SIGKILL, the wrapper's whole process group; bounded."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(10)
                return
            except subprocess.TimeoutExpired:
                continue

    def wait_log(self, predicate, what, seconds=LOG_SECONDS, proc=None):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            records = read_log(self.proxy_log)
            if predicate(records):
                return records
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.2)
        records = read_log(self.proxy_log)
        if predicate(records):
            return records
        self.fail(f"the proxy log never showed {what}; it has:\n" + "\n".join(map(json.dumps, records)))

    def interrupt(self, argv, until, what, env=None):
        """Start the wrapper; once the proxy log satisfies `until`, end the session with SIGTERM
        to the wrapper (what `timeout`, `kill` or a closed terminal's SIGHUP do).  For CLIs that
        retry for minutes.  (Not Ctrl-C: `claude -p` lets a SIGINT pass while it retries.)"""
        err_path = os.path.join(self.root, "stderr.txt")
        out_path = os.path.join(self.root, "stdout.txt")
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(argv, cwd=self.project, env=env or self.env(),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        try:
            records = self.wait_log(until, what, proc=proc)
            if proc.poll() is None:
                proc.terminate()
            try:
                code = proc.wait(EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                self.fail(f"the wrapper did not end within {EXIT_SECONDS} s of SIGTERM")
        finally:
            if proc.poll() is None:
                self.end_group(proc)
        with open(out_path, errors="replace") as f:
            out = f.read()
        with open(err_path, errors="replace") as f:
            err = f.read()
        return code, out, err, records

    # -- common checks --

    def assert_cleaned_up(self):
        self.assertEqual(processes_mentioning(self.proxy_log), [], "a socks_filter.py process is left running")
        self.assertEqual(os.listdir(self.runtime), [], "the wrapper's private directory is left behind")
        # The project started empty, and the CLIs write nothing there for "say hi".
        self.assertEqual(sorted(os.listdir(self.project)), [], "files left in the project directory")

    def wait_screen(self, term, want, what=None, seconds=SCREEN_SECONDS):
        """Wait until the screen shows the text `want` (or satisfies `want`, a predicate);
        fail, showing the screen, if the wrapper ends first or the time is up."""
        predicate = want if callable(want) else lambda screen: want in screen
        deadline = time.monotonic() + seconds
        screen = ""
        while time.monotonic() < deadline:
            screen = term.screen()
            if predicate(screen):
                return screen
            if term.exit_code() is not None:
                break
            time.sleep(0.25)
        self.fail(f"never saw {what or repr(want)} (rc {term.exit_code()}); the screen:\n{screen}\n"
                  f"stderr: {term.stderr()}")

    def summary_line(self, err, tool):
        lines = [line for line in err.splitlines() if line.startswith(f"{tool}: network:")]
        self.assertEqual(len(lines), 1, f"expected one summary line on stderr, got:\n{err}")
        return lines[0]


class TestPrintMode(RealCLITest):
    """`-p "say hi"` through sandbox, socat and proxy: allowed, refused without an allow rule,
    and the real API host with the default allow list."""

    # Allowed: the canned answer comes back, the log shows the allow, the fake saw it.

    def test_claude_answers_through_proxy(self):
        self.need_cli("claude")
        code, out, err = self.run_wrapper(self.wrapper("claude", "--", "-p", "say hi"))
        self.assertEqual(code, 0, f"stdout: {out}\nstderr: {err}")
        self.assertIn(self.answer, out)
        seen = self.fake.requests_to("anthropic")
        self.assertTrue(seen, "the fake Messages API saw no request")
        req = seen[-1]
        self.assertEqual(req["method"], "POST")
        self.assertEqual(req["headers"].get("x-api-key"), KEY)
        self.assertTrue(req["body"].get("stream"), "Claude asked for a non-streamed answer")
        self.assertIn("say hi", json.dumps(req["body"].get("messages")))
        records = read_log(self.proxy_log)
        mine = decisions(records, self.fake.host, self.fake.port)
        self.assertTrue(mine, "the proxy log has no decision about the fake API")
        self.assertTrue(all(r["decision"] == "allow" for r in mine), mine)
        # Claude sends plain-http API calls to HTTP_PROXY in absolute form.
        self.assertIn("http", {r["proto"] for r in mine})
        closes = [r for r in records if r.get("event") == "close" and r.get("port") == self.fake.port]
        self.assertTrue(closes and all(r["reason"] == "closed" for r in closes), closes)
        self.assertGreater(sum(r["bytes_down"] for r in closes), len(self.answer))
        self.assertIn("blocked", self.summary_line(err, "bw-claude"))
        self.assert_cleaned_up()

    def test_gemini_answers_through_proxy(self):
        self.need_cli("gemini")
        self.seed_gemini_settings()
        code, out, err = self.run_wrapper(self.wrapper("gemini", "--", "--skip-trust", "-p", "say hi"))
        self.assertEqual(code, 0, f"stdout: {out}\nstderr: {err}")
        self.assertIn(self.answer, out)
        seen = self.fake.requests_to("gemini")
        self.assertTrue(any(r["path"].endswith(":streamGenerateContent") for r in seen),
                        [r["path"] for r in self.fake.requests])
        self.assertTrue(all(r["headers"].get("x-goog-api-key") == KEY for r in seen))
        self.assertIn("say hi", json.dumps([r["body"] for r in seen]))
        mine = decisions(read_log(self.proxy_log), self.fake.host, self.fake.port)
        self.assertTrue(mine, "the proxy log has no decision about the fake API")
        self.assertTrue(all(r["decision"] == "allow" for r in mine), mine)
        # Gemini's fetch tunnels even plain http:// through CONNECT.
        self.assertEqual({r["proto"] for r in mine}, {"http-connect"})
        self.summary_line(err, "bw-gemini")
        self.assert_cleaned_up()

    # No allow rule for the fake: fails, the log shows the denial, the summary names it.

    def test_claude_without_allow_rule_is_blocked(self):
        self.need_cli("claude")
        code, out, err = self.run_wrapper(self.wrapper("claude", "--", "-p", "say hi", allow=False))
        self.assertNotEqual(code, 0, f"stdout: {out}\nstderr: {err}")
        self.assertNotIn(self.answer, out)
        self.assertEqual(self.fake.requests, [], "a request reached the fake without an allow rule")
        mine = decisions(read_log(self.proxy_log), self.fake.host, self.fake.port)
        self.assertTrue(mine, "the proxy log does not show the denial")
        self.assertTrue(all(r["decision"] == "deny" for r in mine), mine)
        summary = self.summary_line(err, "bw-claude")
        self.assertIn(f"{self.fake.hostport}", summary)
        self.assertIn(f"--allow-domain {self.fake.hostport}", summary)
        self.assert_cleaned_up()

    def test_gemini_without_allow_rule_is_blocked(self):
        self.need_cli("gemini")
        self.seed_gemini_settings()
        # Gemini retries a failed request with backoff for minutes: end the session once the
        # denial is logged.
        fake = self.fake

        def denied(records):
            return any(r["decision"] == "deny" for r in decisions(records, fake.host, fake.port))
        code, out, err, _ = self.interrupt(
            self.wrapper("gemini", "--", "--skip-trust", "-p", "say hi", allow=False),
            denied, f"a denial of {fake.hostport}")
        self.assertEqual(code, 128 + signal.SIGTERM, err)
        self.assertNotIn(self.answer, out)
        self.assertEqual(self.fake.requests, [], "a request reached the fake without an allow rule")
        mine = decisions(read_log(self.proxy_log), fake.host, fake.port)
        self.assertTrue(all(r["decision"] == "deny" for r in mine), mine)
        summary = self.summary_line(err, "bw-gemini")
        self.assertIn(f"--allow-domain {fake.hostport}", summary)
        self.assert_cleaned_up()

    # The default allow list, no fake: the first request is a CONNECT to the real API host,
    # allowed; the lookup then fails (no internet here).

    def check_real_api_host(self, cli, argv):
        host = API_HOSTS[cli]

        def lookup_failed(records):
            return any(r.get("event") == "close" and r.get("host") == host and r.get("port") == 443
                       for r in records)
        code, out, err, _ = self.interrupt(argv, lookup_failed, f"a closed tunnel to {host}:443")
        self.assertEqual(code, 128 + signal.SIGTERM, err)
        records = read_log(self.proxy_log)
        first = [r for r in decisions(records)
                 if not (cli == "gemini" and r["host"] == GEMINI_TELEMETRY)]
        self.assertTrue(first, records)
        self.assertEqual((first[0]["proto"], first[0]["host"], first[0]["port"], first[0]["decision"]),
                         ("http-connect", host, 443, "allow"), first[0])
        closes = [r for r in records if r.get("event") == "close" and r.get("host") == host]
        self.assertTrue(closes)
        self.assertTrue(all(r["reason"] == "lookup-failed" for r in closes), closes)
        other = {(r["host"], r["port"]) for r in decisions(records)} - {(host, 443)}
        expected_other = {(GEMINI_TELEMETRY, 443)} if cli == "gemini" else set()
        self.assertLessEqual(other, expected_other, "unexpected destinations")
        self.assertEqual(self.fake.requests, [])
        self.summary_line(err, "bw-" + cli)
        self.assert_cleaned_up()

    def test_claude_default_profile_reaches_for_real_api(self):
        self.need_cli("claude")
        self.check_real_api_host("claude", self.wrapper("claude", "--", "-p", "say hi",
                                                        fake=False, allow=False))

    def test_gemini_default_profile_reaches_for_real_api(self):
        self.need_cli("gemini")
        self.check_real_api_host("gemini", self.wrapper("gemini", "--", "--skip-trust", "-p", "say hi",
                                                        fake=False, allow=False))


class TestInsideSandbox(RealCLITest):
    """From inside a sandbox set up for a real session, nothing gets out but through
    the proxy, and only to allowed places."""

    def test_no_way_out_but_the_proxy(self):
        self.need_cli("claude")
        self.need(shutil.which("curl"), "curl", "apt-get install curl")
        fake = self.fake
        lines = ["set -u", "r() { echo \"RESULT $1 $2\"; }"]
        lines += [
            # the host's loopback, where the fake listens, straight (not through the proxy)
            f"timeout 10 bash -c 'exec 3<>/dev/tcp/{fake.host}/{fake.port}' 2>/dev/null; r direct $?",
            # no interface but lo, no route anywhere else (checked without sending anything)
            "echo IFACES $(tail -n +3 /proc/net/dev | cut -d: -f1)",
            "echo ROUTES $(tail -n +2 /proc/net/route | wc -l)",
            # DNS: nothing to ask, not even for an allowed name
            "timeout 10 getent hosts api.anthropic.com >/dev/null; r dns_allowed $?",
            "timeout 10 getent hosts example.com >/dev/null; r dns_other $?",
            # a name outside the allow list, through HTTPS_PROXY (http CONNECT) and ALL_PROXY (socks5h)
            "curl -sS -o /dev/null --max-time 20 https://example.com/ 2>/dev/null; r curl_https_proxy $?",
            "env -u HTTPS_PROXY -u https_proxy -u HTTP_PROXY -u http_proxy "
            "curl -sS -o /dev/null --max-time 20 https://example.com/ 2>/dev/null; r curl_all_proxy $?",
            # controls: the allowed fake through both
            f"curl -sS --max-time 20 -d '{{}}' {fake.url}/v1/messages | grep -q '{self.answer}'; r fake_http_proxy $?",
            "env -u HTTPS_PROXY -u https_proxy -u HTTP_PROXY -u http_proxy "
            f"curl -sS --max-time 20 -d '{{}}' {fake.url}/v1/messages | grep -q '{self.answer}'; r fake_all_proxy $?",
            # and the real CLI, in the same sandbox
            "timeout 60 claude -p 'say hi'; r claude $?",
        ]
        code, out, err = self.run_wrapper(self.wrapper("claude", "--shell", "--", "-c", "\n".join(lines)))
        self.assertEqual(code, 0, f"stdout: {out}\nstderr: {err}")
        results = dict(line.split()[1:3] for line in out.splitlines() if line.startswith("RESULT "))
        self.assertIn("IFACES lo\n", out)
        self.assertIn("ROUTES 0\n", out)
        for name in ("direct", "dns_allowed", "dns_other", "curl_https_proxy", "curl_all_proxy"):
            self.assertIsNotNone(results.get(name), out)
            self.assertNotEqual(results[name], "0", f"{name} succeeded:\n{out}\n{err}")
        for name in ("fake_http_proxy", "fake_all_proxy", "claude"):
            self.assertEqual(results.get(name), "0", f"{name} failed:\n{out}\n{err}")
        self.assertIn(self.answer, out.replace("RESULT", ""))
        records = read_log(self.proxy_log)
        denied = {r["proto"] for r in decisions(records, "example.com", 443) if r["decision"] == "deny"}
        self.assertIn("http-connect", denied)
        self.assertIn("socks5", denied)
        allowed = {r["proto"] for r in decisions(records, fake.host, fake.port) if r["decision"] == "allow"}
        self.assertLessEqual({"http", "socks5"}, allowed)
        self.assertTrue(self.fake.requests_to("anthropic"))
        self.assertIn("example.com:443", self.summary_line(err, "bw-claude"))
        self.assert_cleaned_up()


class Tmux:
    """One detached tmux server on a private socket running one command, for a real pty."""

    def __init__(self, workdir, argv, env, cwd, width=120, height=40):
        self.socket = os.path.join(workdir, "tmux.sock")
        self.rc_path = os.path.join(workdir, "rc")
        self.err_path = os.path.join(workdir, "stderr.txt")
        script = os.path.join(workdir, "run.sh")
        env = dict(env, TERM="screen")
        with open(script, "w") as f:
            f.write(f"cd {shlex.quote(cwd)} || exit 1\n"
                    f"env -i {shlex.join(f'{k}={v}' for k, v in env.items())} "
                    f"{shlex.join(argv)} 2>{shlex.quote(self.err_path)}\n"
                    f"echo $? >{shlex.quote(self.rc_path)}.tmp && "
                    f"mv {shlex.quote(self.rc_path)}.tmp {shlex.quote(self.rc_path)}\n")
        self.tmux("new-session", "-d", "-s", "bw", "-x", str(width), "-y", str(height), f"sh {shlex.quote(script)}")

    def tmux(self, *args, check=True):
        env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
        return subprocess.run(["tmux", "-S", self.socket, "-f", "/dev/null", *args], check=check,
                              env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=20)

    def screen(self):
        result = self.tmux("capture-pane", "-p", "-t", "bw", check=False)
        return result.stdout if result.returncode == 0 else ""

    def keys(self, *keys):
        self.tmux("send-keys", "-t", "bw", *keys)

    def text(self, text):
        self.tmux("send-keys", "-t", "bw", "-l", text)

    def exit_code(self):
        try:
            with open(self.rc_path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def stderr(self):
        try:
            with open(self.err_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def close(self):
        self.tmux("kill-server", check=False)


class TestInteractive(RealCLITest):
    """Interactive Claude under a real pseudo-terminal."""

    # Dialogs a user who already onboarded meets on first start in a new place, and the key
    # that answers each.
    DIALOGS = (
        ("trust this folder", "1"),                       # 1. Yes, I trust this folder
        ("Do you want to use this API key", "1"),         # 1. Yes
        ("Bypass Permissions mode", "2"),                 # 2. Yes, I accept (--allow-dangerously-...)
    )
    PROMPT_MARKS = ("? for shortcuts", "Welcome back")

    def setUp(self):
        super().setUp()
        self.need_cli("claude")
        self.need(shutil.which("tmux"), "tmux", "apt-get install tmux")
        # A user who already went through onboarding (theme, login); without it Claude first
        # checks that it can reach api.anthropic.com itself and stops: no internet here.
        with open(os.path.join(self.home, ".claude.json"), "w") as f:
            json.dump({"hasCompletedOnboarding": True, "theme": "dark"}, f)

    def start(self, name):
        workdir = os.path.join(self.root, name)
        os.mkdir(workdir)
        term = Tmux(workdir, self.wrapper("claude"), self.env(), self.project)
        self.addCleanup(self.close, term)
        return term

    def close(self, term):
        """Kill the tmux server (its pane's wrapper gets SIGHUP) and let the wrapper finish
        its clean-up before the temporary directory goes; bounded."""
        term.close()
        deadline = time.monotonic() + EXIT_SECONDS
        while processes_mentioning(self.proxy_log) and time.monotonic() < deadline:
            time.sleep(0.2)

    def reach_prompt(self, term):
        """Answer the first-start dialogs until the input prompt shows.  Returns the dialogs seen."""
        seen = []
        for _ in range(len(self.DIALOGS) + 1):
            screen = self.wait_screen(
                term, lambda s: any(m in s for m in self.PROMPT_MARKS)
                or any(d in s for d, _ in self.DIALOGS), "Claude's first screen")
            dialog = next(((d, k) for d, k in self.DIALOGS if d in screen), None)
            if dialog is None:
                return seen, screen
            seen.append(dialog[0])
            term.keys(dialog[1])
            self.wait_screen(term, lambda s, d=dialog[0]: d not in s, f"the dialog {dialog[0]!r} go")
        self.fail(f"dialogs kept coming: {seen}")

    def quit(self, term):
        """Ctrl-C twice, as Claude's status line asks ('Press Ctrl-C again to exit')."""
        term.keys("C-c")
        self.wait_screen(term, lambda s: "again to exit" in s, "'Press Ctrl-C again to exit'", 10)
        term.keys("C-c")
        deadline = time.monotonic() + EXIT_SECONDS
        while term.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        code = term.exit_code()
        self.assertIsNotNone(code, f"the wrapper did not exit; the screen:\n{term.screen()}")
        return code

    def test_interactive_start_answer_and_quit(self):
        """Start without -p under a pty, see the first screen, ask, quit; clean exit."""
        term = self.start("run1")
        dialogs, screen = self.reach_prompt(term)
        self.assertIn("Claude Code", screen)
        term.text("say hi")
        self.wait_screen(term, lambda s: "say hi" in s, "the typed prompt", 10)
        term.keys("Enter")
        self.wait_screen(term, lambda s: self.answer in s, "the fake API's answer on screen")
        code = self.quit(term)
        self.assertEqual(code, 0, term.stderr())
        self.assertTrue(self.fake.requests_to("anthropic"))
        self.assertTrue(any(r["decision"] == "allow" for r in
                            decisions(read_log(self.proxy_log), self.fake.host, self.fake.port)))
        self.summary_line(term.stderr(), "bw-claude")
        self.assert_cleaned_up()

    def test_state_survives_two_sessions(self):
        """After two sandboxed sessions ~/.claude.json is valid, counts both, and nothing is
        left beside it; what the first session's dialogs settled is remembered by the second,
        except the API key's approval (customApiKeyResponses never flows back: the sandbox
        could approve a key)."""
        first_dialogs = []
        for n in (1, 2):
            term = self.start(f"run{n}")
            dialogs, screen = self.reach_prompt(term)
            if n == 1:
                first_dialogs = dialogs
            else:
                again = [d for d in dialogs if d != "Do you want to use this API key"]
                self.assertEqual(again, [], f"the second session asked again: {dialogs}\n{screen}")
            self.assertEqual(self.quit(term), 0, term.stderr())
            term.close()
            self.assert_cleaned_up()
            with open(os.path.join(self.home, ".claude.json")) as f:
                state = json.load(f)
            self.assertEqual(state.get("numStartups"), n, "the startup counter did not advance")
        self.assertIn("trust this folder", first_dialogs)
        self.assertTrue(state.get("hasCompletedOnboarding"))
        self.assertTrue(state["projects"][self.project]["hasTrustDialogAccepted"])
        self.assertNotIn("customApiKeyResponses", state)
        left = []
        for root, dirs, files in os.walk(self.home):
            for name in dirs + files:
                if name.endswith(".lock") or ".tmp." in name or name.endswith(".tmp"):
                    left.append(os.path.join(root, name))
        self.assertEqual(left, [], "lock or temporary files left in home")
        self.assertEqual(sorted(os.listdir(self.home)), [".cache", ".claude", ".claude.json"])
        # .cache holds only where sessions live, empty once they are over.
        self.assertEqual(os.listdir(os.path.join(self.home, ".cache")), ["bw-claude"])
        self.assertEqual(os.listdir(os.path.join(self.home, ".cache", "bw-claude")), [])


# -- the CLI's state across sessions -----------------------------------------------------------

class RealClaudeState(RealCLITest):
    """The real Claude Code: a transcript written in one sandboxed session is what
    `--continue` resumes in the next."""

    def test_continue_sees_the_first_session(self):
        self.need_cli("claude")
        marker = f"remember-{uuid.uuid4().hex[:8]}"
        code, out, err = self.run_wrapper(self.wrapper("claude", "--", "-p", f"first {marker}"))
        self.assertEqual(code, 0, f"stdout: {out}\nstderr: {err}")
        slug_dir = os.path.join(self.home, ".claude", "projects",
                                bw_lib.project_slug(self.project))
        self.assertEqual(os.listdir(os.path.join(self.home, ".claude", "projects")),
                         [os.path.basename(slug_dir)])
        transcripts = [n for n in os.listdir(slug_dir) if n.endswith(".jsonl")]
        self.assertEqual(len(transcripts), 1, os.listdir(slug_dir))
        code, out, err = self.run_wrapper(self.wrapper("claude", "--", "-p", "--continue",
                                                       "second"))
        self.assertEqual(code, 0, f"stdout: {out}\nstderr: {err}")
        self.assertIn(self.answer, out)
        last = self.fake.requests_to("anthropic")[-1]
        self.assertIn(marker, json.dumps(last["body"].get("messages")),
                      "--continue did not bring back the first session")
        # .cache holds only the (now empty) base of the sessions' directories.
        self.assertEqual(sorted(os.listdir(self.home)), [".cache", ".claude", ".claude.json"])
        self.assertEqual(os.listdir(os.path.join(self.home, ".cache", "bw-claude")), [])
        self.assertEqual(sorted(os.listdir(os.path.join(self.home, ".claude"))), ["projects"])
        self.assert_cleaned_up()


class RealGeminiResume(RealCLITest):
    def test_resume_sees_the_first_session(self):
        self.need_cli("gemini")
        self.seed_gemini_settings()
        marker = f"remember-{uuid.uuid4().hex[:8]}"
        code, out, err = self.run_wrapper(self.wrapper("gemini", "--", "--skip-trust", "-p",
                                                       f"first {marker}"))
        self.assertEqual(code, 0, f"stdout: {out}\nstderr: {err}")
        code, out, err = self.run_wrapper(self.wrapper("gemini", "--", "--skip-trust", "--resume",
                                                       "latest", "-p", "second"))
        self.assertEqual(code, 0, f"stdout: {out}\nstderr: {err}")
        self.assertIn(self.answer, out)
        last = [r for r in self.fake.requests_to("gemini")
                if r["path"].endswith(":streamGenerateContent")][-1]
        self.assertIn(marker, json.dumps(last["body"]), "--resume did not bring back the chat")


class RealGeminiTrust(RealCLITest):
    """The real Gemini CLI's "Do you trust the files in this folder?" prompt: answered inside,
    the session goes on (it ended with rc 52 "Failed to save trust settings" while
    trustedFolders.json was a single-file bind), and trust is saved for this project only."""

    def test_trust_prompt_saves_trust_for_this_project_only(self):
        self.need_cli("gemini")
        self.need(shutil.which("tmux"), "tmux", "apt-get install tmux")
        self.seed_gemini_settings()
        other = os.path.join(self.root, "other")
        trusted = os.path.join(self.home, ".gemini", "trustedFolders.json")
        with open(trusted, "w") as f:
            json.dump({other: "TRUST_FOLDER"}, f)
        workdir = os.path.join(self.root, "tmux")
        os.mkdir(workdir)
        term = Tmux(workdir, self.wrapper("gemini"), self.env(), self.project)
        self.addCleanup(term.close)
        self.wait_screen(term, "Do you trust the files in this folder?")
        self.assertIn("1. Trust folder", term.screen())
        term.keys("1")
        time.sleep(0.5)
        term.keys("Enter")
        self.wait_screen(term, "Type your message")
        term.text("say hi")
        time.sleep(0.5)
        term.keys("Enter")
        self.wait_screen(term, self.answer)
        term.text("/quit")
        time.sleep(0.5)
        term.keys("Enter")
        deadline = time.monotonic() + EXIT_SECONDS
        while term.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        self.assertEqual(term.exit_code(), 0, f"{term.screen()}\n{term.stderr()}")
        with open(trusted) as f:
            self.assertEqual(json.load(f), {other: "TRUST_FOLDER", self.project: "TRUST_FOLDER"})
        self.assertTrue(any(r["decision"] == "allow" for r in
                            decisions(read_log(self.proxy_log), self.fake.host, self.fake.port)))



if __name__ == "__main__":
    unittest.main()
