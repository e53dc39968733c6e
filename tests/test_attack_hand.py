"""Attacks on the late hand of the proxy's socket (commit 4f111a7): the wrapper keeps the
listening socket until a connection waits in its backlog or PROXY_HAND_SECONDS after bwrap
started (at once with --learn/--proxy-log), and only then gives it, with the arguments, to the
proxy's interpreter, which waited in select() on its stdin until then.

The threat: the agent inside is hostile (it can connect to /run/bw/proxy.sock directly, flood
it, connect and close, time its requests to the hand and to its own end), and the session can
be signalled or killed at any moment.  The filter must never fail open, the summary must
never say "nothing went out" when something did, nothing (proxy, interpreter, socket,
directory) may outlive the session, and the session must end within a bound.

Every test runs the real wrapper.  Upstreams listen on the host's 127.0.0.1 only; the names
the sandbox asks for that are not loopback (blocked.example) are refused by the proxy before
any lookup.  Tests marked PRE-HAND run the wrapper with PROXY_HAND_SECONDS raised (the same
code path a slow or loaded machine takes when the session's start outlasts it): the time
before the hand then lasts as long as the test needs."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import unittest

import bw_lib
from tests.sandbox_harness import (BW_CLAUDE, REPO, RecordingUpstream, SessionCase, alive,
                                   children, command_line, loopback, processes_mentioning,
                                   read_log, wait_for)

# bw-claude run with bw_lib.PROXY_HAND_SECONDS set first (argv: REPO SECONDS BW_CLAUDE ARGS).
LAUNCH = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); import bw_lib; "
          "bw_lib.PROXY_HAND_SECONDS = float(sys.argv[2]); script = sys.argv[3]; "
          "sys.argv = sys.argv[3:]; runpy.run_path(script, run_name='__main__')")

# The same, with a SIGTERM to the wrapper arriving the moment ProxyInterpreter.hand returns
# (the socket and arguments sent, FilterProxy.hand not yet done), and, when argv[3] is "slow",
# stop_sandbox taking SLOW seconds first (a loaded machine: bwrap slow to exit).
# argv: REPO SECONDS slow|fast BW_CLAUDE ARGS.
SLOW = 1.0
LAUNCH_SIGNAL_AT_HAND = (
    "import os, runpy, signal, sys, time; sys.path.insert(0, sys.argv[1]); import bw_lib; "
    "bw_lib.PROXY_HAND_SECONDS = float(sys.argv[2]); slow = sys.argv[3] == 'slow'; "
    "original_hand, original_stop = bw_lib.ProxyInterpreter.hand, bw_lib.stop_sandbox\n"
    "def hand(self, *args):\n"
    "    original_hand(self, *args)\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "def stop_sandbox(*args):\n"
    "    time.sleep(%r if slow else 0)\n"
    "    original_stop(*args)\n"
    "bw_lib.ProxyInterpreter.hand, bw_lib.stop_sandbox = hand, stop_sandbox\n"
    "script = sys.argv[4]; sys.argv = sys.argv[4:]; runpy.run_path(script, run_name='__main__')"
) % SLOW

# Inside the sandbox: python3 FLOOD COUNT HOSTPORT -- open COUNT connections to the proxy's
# socket (/run/bw/proxy.sock there) at once, each a plain-HTTP GET of http://HOSTPORT/, then print each status code seen
# ("none" for a connection closed or refused without one).
FLOOD = r"""
import socket, sys, time
count, target = int(sys.argv[1]), sys.argv[2]
conns = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    try:
        s.connect("/run/bw/proxy.sock")
        s.sendall(f"GET http://{target}/ HTTP/1.0\r\nHost: {target}\r\n\r\n".encode())
    except OSError as error:
        print("connect-error", type(error).__name__)
        continue
    conns.append(s)
codes = {}
for s in conns:
    try:
        first = s.recv(64).split(b" ")
        code = first[1].decode() if len(first) > 1 else "none"
    except OSError:
        code = "none"
    codes[code] = codes.get(code, 0) + 1
    s.close()
print("codes", sorted(codes.items()))
"""

# Inside the sandbox: connect and close COUNT times, as fast as it can.
CHURN = r"""
import socket, sys
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect("/run/bw/proxy.sock")
    except OSError:
        pass
    s.close()
print("churned")
"""

# Inside the sandbox: write one GET of http://HOSTPORT/ to the proxy's socket and exit at once
# (the session ends with the request in the socket, unanswered).
FIRE = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect("/run/bw/proxy.sock")
s.sendall(f"GET http://{sys.argv[1]}/ HTTP/1.0\r\nHost: {sys.argv[1]}\r\n\r\n".encode())
"""


def get(target, label):
    """Shell: a plain-HTTP GET of http://TARGET/ through the sandbox's HTTP proxy."""
    return (f"curl -sS --noproxy '' -x \"$HTTP_PROXY\" -m 8 -o /dev/null "
            f"-w '{label}=%{{http_code}}\\n' http://{target}/")


def network_lines(stderr):
    return [line for line in stderr.splitlines() if re.search(r"network: \d+ allowed", line)]


def counts(line):
    """(allowed, blocked) from a summary line."""
    found = re.search(r"network: (\d+) allowed, (\d+) blocked", line)
    return (int(found.group(1)), int(found.group(2))) if found else None


def interpreters_of(pid):
    """The proxy interpreters (ProxyInterpreter) the wrapper `pid` started and that run."""
    return [child for child in children(pid) if "main_from_stdin" in command_line(child)
            and alive(child)]


def listening_inode(path):
    """The inode of the listening unix socket bound at `path` (from /proc/net/unix)."""
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and fields[5] == "01":
                return int(fields[6])
    return None


def holders(inode):
    """The pids with a descriptor on socket `inode`."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    found.add(int(pid))
        except OSError:
            continue
    return sorted(found)


class HandCase(SessionCase):
    PREFIX = "bw-attack-hand-"
    TOOLS = ("socat", "curl", "python3")

    def setUp(self):
        super().setUp()
        self.flood = self.script("flood.py", FLOOD)
        self.churn = self.script("churn.py", CHURN)
        self.fire = self.script("fire.py", FIRE)

    def script(self, name, text):
        path = os.path.join(self.project, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def upstream(self):
        server = RecordingUpstream("http")
        self.addCleanup(server.stop)
        return server

    def no_proxy_left(self):
        """No process runs socks_filter.py of this checkout, no session directory is left."""
        self.assertTrue(wait_for(lambda: not processes_mentioning(bw_lib.FILTER_SCRIPT), 10),
                        [command_line(int(p)) for p in processes_mentioning(bw_lib.FILTER_SCRIPT)])
        self.assert_clean()

    def launched(self, seconds, *argv, **kwargs):
        """The wrapper, left running, with PROXY_HAND_SECONDS = seconds."""
        kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kwargs}
        process = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCH, REPO, str(seconds),
                                    BW_CLAUDE, *argv], cwd=self.project, env=self.env, **kwargs)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        return process

    def up(self):
        return os.path.exists(os.path.join(self.project, "up"))

    def finish(self, process, seconds=30):
        try:
            out, err = process.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            self.fail(f"the session outlived {seconds} s: {err}")
        self.assertNotIn("Traceback", err)
        return out, err


class AroundTheHandTest(HandCase):
    """Sessions at the real PROXY_HAND_SECONDS."""

    def test_sessions_ending_around_the_hand_time_end_clean_with_one_true_line(self):
        step = bw_lib.PROXY_HAND_SECONDS
        for delay in (0, step * 0.3, step * 0.6, step * 0.9, step, step * 1.1, step * 1.3,
                      step * 2, step * 3):
            with self.subTest(delay=delay):
                started = time.monotonic()
                result = self.shell(f"sleep {delay:.3f}", "--no-defaults", "--filter-network",
                                    code=0, timeout=60)
                self.assertLess(time.monotonic() - started, 15)
                lines = network_lines(result.stderr)
                self.assertEqual(len(lines), 1, result.stderr)
                self.assertEqual(counts(lines[0]), (0, 0), result.stderr)
                self.no_proxy_left()

    def test_a_request_left_in_the_socket_as_the_session_ends_is_never_hidden(self):
        """The sandbox writes a request for an allowed upstream into the socket and exits at
        once, at times around the hand: either the upstream saw nothing, or the summary
        counts it; "nothing went out" is never said of a session that reached it."""
        server = self.upstream()
        target = f"127.0.0.1:{server.port}"
        step = bw_lib.PROXY_HAND_SECONDS
        for delay in (0, step * 0.5, step * 0.9, step, step * 1.1, step * 1.5, step * 3):
            for attempt in range(2):
                with self.subTest(delay=delay, attempt=attempt):
                    before = server.accepted
                    result = self.shell(f"sleep {delay:.3f}; python3 {self.fire} {target}",
                                        "--no-defaults", "--filter-network",
                                        *loopback(server), code=0, timeout=60)
                    time.sleep(0.3)         # an upstream connection still on its way
                    reached = server.accepted - before
                    lines = network_lines(result.stderr)
                    self.assertEqual(len(lines), 1, result.stderr)
                    if reached:
                        self.assertNotIn("nothing went out", lines[0], result.stderr)
                        self.assertGreaterEqual(counts(lines[0])[0], 1, result.stderr)
                    self.no_proxy_left()

    def test_a_flood_before_the_hand_is_all_filtered(self):
        """300 connections at once from the sandbox's first moment (all in the backlog before
        the proxy imports anything): every one is answered 403 once it serves, none reaches
        the (never allowed) upstream, and the summary counts them."""
        server = self.upstream()
        count = 300
        result = self.shell(f"python3 {self.flood} {count} 127.0.0.1:{server.port}; "
                            f"python3 {self.flood} 20 blocked.example",
                            "--no-defaults", "--filter-network", code=0, timeout=90)
        self.assertEqual(server.accepted, 0, result.stderr)
        self.assertIn(f"codes [('403', {count})]", result.stdout, result.stderr)
        self.assertIn("codes [('403', 20)]", result.stdout, result.stderr)
        self.assertNotIn("200", result.stdout)
        lines = network_lines(result.stderr)
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertEqual(counts(lines[0]), (0, count + 20), result.stderr)
        self.no_proxy_left()

    def test_connecting_and_closing_over_and_over_starts_one_proxy_that_filters(self):
        """Connections made and closed before the hand (each one makes the listener readable
        once): the proxy is handed its socket once, and then serves and filters."""
        server = self.upstream()
        target = f"127.0.0.1:{server.port}"
        result = self.shell(f"python3 {self.churn} 200; {get(target, 'allowed')}; "
                            f"python3 {self.churn} 200; {get('blocked.example', 'blocked')}; "
                            f"{get('127.0.0.2:9', 'other')}",
                            "--no-defaults", "--filter-network", *loopback(server), code=0,
                            timeout=90)
        self.assertIn("allowed=200", result.stdout, result.stderr)
        self.assertIn("blocked=403", result.stdout, result.stderr)
        self.assertIn("other=403", result.stdout, result.stderr)
        self.assertEqual(server.accepted, 1)
        lines = network_lines(result.stderr)
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertEqual(counts(lines[0]), (1, 2), result.stderr)
        self.no_proxy_left()

    def test_learn_and_proxy_log_are_written_for_a_session_shorter_than_the_hand(self):
        learned = os.path.join(self.root, "learned.allow")
        result = self.shell("true", "--no-defaults", "--learn", learned, code=0)
        self.assertTrue(os.path.isfile(learned), result.stderr)
        self.assertIn("learn: wrote", result.stderr)
        self.assertNotIn("nothing went out", result.stderr)
        self.no_proxy_left()
        log = os.path.join(self.root, "proxy.jsonl")
        server = self.upstream()
        result = self.shell(f"python3 {self.fire} 127.0.0.1:{server.port}", "--no-defaults",
                            "--filter-network", "--proxy-log", log, *loopback(server), code=0)
        self.assertTrue(os.path.isfile(log), result.stderr)
        lines = network_lines(result.stderr)
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertNotIn("nothing went out", lines[0])
        # What the proxy decided is in the log and in the summary, whatever it got to.
        allowed = [r for r in read_log(log) if r.get("event") == "decision"
                   and r.get("decision") == "allow"]
        self.assertEqual(counts(lines[0])[0], len(allowed), (result.stderr, read_log(log)))
        self.no_proxy_left()

    def test_verbose_session_tells_the_proxy_command_and_serves(self):
        server = self.upstream()
        result = self.shell(get(f"127.0.0.1:{server.port}", "code"), "-v", "--no-defaults",
                            "--filter-network", *loopback(server), code=0)
        self.assertIn("code=200", result.stdout, result.stderr)
        proxy_lines = [line for line in result.stderr.splitlines()
                       if "socks_filter.py" in line and "--listen-fd" in line]
        self.assertEqual(len(proxy_lines), 1, result.stderr)
        self.assertIn("start-up:", result.stderr)
        self.assertEqual(counts(network_lines(result.stderr)[0]), (1, 0), result.stderr)
        self.no_proxy_left()

    def test_sigterm_and_sighup_at_times_around_the_hand(self):
        """The wrapper signalled 0-0.3 s after the sandbox is up (before, at and after the
        hand, during the proxy's start): the session ends within a bound, with the signal's
        status, at most one network line, nothing left."""
        step = bw_lib.PROXY_HAND_SECONDS
        for sig in (signal.SIGTERM, signal.SIGHUP):
            for delay in (0, step * 0.5, step, step * 1.3, step * 2, step * 3):
                with self.subTest(sig=sig.name, delay=delay):
                    remove_marker(os.path.join(self.project, "up"))
                    session = self.popen("--no-defaults", "--filter-network", "--shell", "--",
                                         "-c", ": > up; sleep 30")
                    self.assertTrue(wait_for(self.up, 30))
                    time.sleep(delay)
                    session.send_signal(sig)
                    out, err = self.finish(session)
                    self.assertEqual(session.returncode, 128 + sig, err)
                    self.assertLessEqual(len(network_lines(err)), 1, err)
                    self.no_proxy_left()

    def test_a_hand_too_big_for_the_socket_buffer_around_the_session_end(self):
        """7000 rules: the arguments (~150 KB) do not fit the interpreter's stdin buffer, so
        hand() blocks until the interpreter, importing socks_filter, reads them; argparse then
        takes about a second.  Sessions ending before, at and after the hand stay bounded and
        say one true line; a request made before the hand waits for the slow start and is
        filtered."""
        rules = os.path.join(self.root, "many-rules")
        with open(rules, "w") as f:
            f.writelines(f"h{i}.example.com:443\n" for i in range(7000))
        server = self.upstream()
        step = bw_lib.PROXY_HAND_SECONDS
        for delay in (step * 0.5, step, step * 1.2, step * 3):
            with self.subTest(delay=delay):
                started = time.monotonic()
                result = self.shell(f"sleep {delay:.3f}", "--no-defaults", "--filter-network",
                                    "--allow-file", rules, code=0, timeout=60)
                self.assertLess(time.monotonic() - started, 15)
                lines = network_lines(result.stderr)
                self.assertEqual(len(lines), 1, result.stderr)
                self.assertEqual(counts(lines[0]), (0, 0), result.stderr)
                self.no_proxy_left()
        result = self.shell(f"{get(f'127.0.0.1:{server.port}', 'code')}; "
                            f"{get('blocked.example', 'blocked')}", "--no-defaults",
                            "--filter-network", "--allow-file", rules, *loopback(server),
                            code=0, timeout=60)
        self.assertIn("code=200", result.stdout, result.stderr)
        self.assertIn("blocked=403", result.stdout, result.stderr)
        self.assertEqual(counts(network_lines(result.stderr)[0]), (1, 1), result.stderr)
        self.no_proxy_left()

    def test_the_early_interpreter_killed_during_the_plan_ends_the_session_without_network(self):
        """The proxy's interpreter SIGKILLed as soon as it appears (before bwrap starts, long
        before the hand): the session ends with the proxy's failure, and the sandbox never
        reached the upstream."""
        server = self.upstream()
        target = f"127.0.0.1:{server.port}"
        session = self.popen("--no-defaults", "--filter-network", *loopback(server), "--shell",
                             "--", "-c", f"sleep 1; {get(target, 'code')}; python3 {self.fire} "
                             f"{target}; sleep 2")
        killed = None
        deadline = time.monotonic() + 10
        while killed is None and time.monotonic() < deadline and session.poll() is None:
            found = interpreters_of(session.pid)
            if found:
                os.kill(found[0], signal.SIGKILL)
                killed = found[0]
            time.sleep(0.001)
        self.assertIsNotNone(killed, "no interpreter seen")
        out, err = self.finish(session)
        self.assertNotEqual(session.returncode, 0, err)
        self.assertIn("the filtering proxy did not start", err)
        self.assertIn("the sandbox had no network", err)
        self.assertNotIn("code=200", out)
        self.assertEqual(server.accepted, 0)
        self.no_proxy_left()


def after_go(commands, checks):
    """Shell text for the sandbox: say "up", wait (at most `checks` x 0.05 s) for the test's
    "go", then run `commands`."""
    return (": > up; i=0; while [ ! -e go ] && [ $i -lt %d ]; do sleep 0.05; i=$((i+1)); "
            "done; %s" % (checks, commands))


def remove_marker(path):
    """Remove a file if it is there (a marker from the previous subtest)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class PreHandTest(HandCase):
    """PRE-HAND: PROXY_HAND_SECONDS raised to HOLD, so the moment before the hand lasts."""

    HOLD = 60

    def test_a_connection_alone_hands_the_socket(self):
        server = self.upstream()
        started = time.monotonic()
        session = self.launched(self.HOLD, "--no-defaults", "--filter-network", *loopback(server),
                                "--shell", "--", "-c",
                                f"sleep 0.5; {get(f'127.0.0.1:{server.port}', 'code')}")
        out, err = self.finish(session, 40)
        self.assertLess(time.monotonic() - started, 30)
        self.assertEqual(session.returncode, 0, err)
        self.assertIn("code=200", out, err)
        self.assertEqual(counts(network_lines(err)[0]), (1, 0), err)
        self.no_proxy_left()

    def test_the_interpreter_killed_before_the_hand_ends_the_session(self):
        """The sandbox runs, the wrapper holds the socket, the interpreter waits: SIGKILLed
        (or SIGTERMed) then, the session ends (bounded) with the proxy's failure, and the
        sandbox's request made after the kill never reaches the upstream."""
        for sig in (signal.SIGKILL, signal.SIGTERM):
            with self.subTest(sig=sig.name):
                for name in ("up", "go"):
                    remove_marker(os.path.join(self.project, name))
                self.interpreter_killed_before_the_hand(sig)

    def interpreter_killed_before_the_hand(self, sig):
        server = self.upstream()
        target = f"127.0.0.1:{server.port}"
        session = self.launched(self.HOLD, "--no-defaults", "--filter-network", *loopback(server),
                                "--shell", "--", "-c", after_go(
                                    f"{get(target, 'code')}; python3 {self.fire} {target}; "
                                    "sleep 5", 300))
        self.assertTrue(wait_for(self.up, 30))
        found = interpreters_of(session.pid)
        self.assertEqual(len(found), 1, [command_line(c) for c in children(session.pid)])
        os.kill(found[0], sig)
        with open(os.path.join(self.project, "go"), "w"):
            pass
        started = time.monotonic()
        out, err = self.finish(session)
        self.assertLess(time.monotonic() - started, 10)
        self.assertNotEqual(session.returncode, 0, err)
        self.assertIn("the filtering proxy did not start", err)
        self.assertIn(f"status {-sig}", err)
        self.assertIn("the sandbox had no network", err)
        self.assertNotIn("code=200", out)
        self.assertEqual(server.accepted, 0)
        self.no_proxy_left()

    def test_signals_before_the_hand(self):
        """SIGTERM and SIGHUP end the session (128+sig, "nothing went out" true: the upstream
        saw nothing, nothing left); SIGINT to the wrapper alone is ignored (the CLI's)."""
        server = self.upstream()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            with self.subTest(sig=sig.name):
                remove_marker(os.path.join(self.project, "up"))
                remove_marker(os.path.join(self.project, "done"))
                session = self.launched(self.HOLD, "--no-defaults", "--filter-network",
                                        *loopback(server), "--shell", "--", "-c",
                                        ": > up; sleep 1; : > done")
                self.assertTrue(wait_for(self.up, 30))
                # The wrapper set its handlers once bwrap started; the sandbox says "up" later.
                session.send_signal(sig)
                out, err = self.finish(session)
                lines = network_lines(err)
                self.assertEqual(len(lines), 1, err)
                self.assertIn("nothing went out", lines[0])
                if sig == signal.SIGINT:
                    self.assertEqual(session.returncode, 0, err)
                    self.assertTrue(os.path.exists(os.path.join(self.project, "done")))
                else:
                    self.assertEqual(session.returncode, 128 + sig, err)
                self.assertEqual(server.accepted, 0)
                self.no_proxy_left()

    def test_a_wrapper_killed_before_the_hand_leaves_no_proxy_and_no_way_out(self):
        """SIGKILL to the wrapper while it holds the socket: the waiting interpreter exits
        (its stdin ends), the sandbox dies with bwrap, the socket refuses, and the next
        session does not trip over what is left."""
        server = self.upstream()
        session = self.launched(self.HOLD, "--no-defaults", "--filter-network", *loopback(server),
                                "--shell", "--", "-c", ": > up; sleep 30")
        self.assertTrue(wait_for(self.up, 30))
        found = interpreters_of(session.pid)
        self.assertEqual(len(found), 1)
        sockets = [os.path.join(self.runtime, name, "proxy.sock")
                   for name in os.listdir(self.runtime) if name.startswith("bw-claude.")]
        self.assertEqual(len(sockets), 1, os.listdir(self.runtime))
        session.kill()
        session.communicate(timeout=30)
        self.assertTrue(wait_for(lambda: not alive(found[0]), 10),
                        "the proxy's interpreter outlived its wrapper")
        self.assertTrue(wait_for(lambda: not processes_mentioning(self.project), 10),
                        "the sandbox outlived its wrapper")
        with socket.socket(socket.AF_UNIX) as late:
            with self.assertRaises((ConnectionRefusedError, FileNotFoundError)):
                late.connect(sockets[0])
        # The next session runs and filters as any.
        result = self.shell(get(f"127.0.0.1:{server.port}", "code"), "--no-defaults",
                            "--filter-network", *loopback(server), code=0)
        self.assertIn("code=200", result.stdout, result.stderr)
        self.assertEqual(server.accepted, 1)
        self.assertTrue(wait_for(lambda: not processes_mentioning(bw_lib.FILTER_SCRIPT), 10))
        self.assertEqual([n for n in os.listdir(self.runtime) if n.startswith("bw-claude.")], [],
                         "the killed session's socket directory was not swept")

    def test_only_the_wrapper_holds_the_socket_before_the_hand_and_only_the_proxy_after(self):
        """No child of the wrapper (bwrap, the sandbox, the interpreter) inherited the
        listening socket the wrapper keeps until the hand: a proxy that dies after the hand
        takes it along."""
        server = self.upstream()
        session = self.launched(self.HOLD, "--no-defaults", "--filter-network", *loopback(server),
                                "--shell", "--", "-c",
                                ": > up; i=0; while [ ! -e go ] && [ $i -lt 300 ]; do "
                                f"sleep 0.05; i=$((i+1)); done; "
                                f"{get(f'127.0.0.1:{server.port}', 'code')}; : > served; "
                                "i=0; while [ ! -e end ] && [ $i -lt 300 ]; do "
                                "sleep 0.05; i=$((i+1)); done")
        self.assertTrue(wait_for(self.up, 30))
        [path] = [os.path.join(self.runtime, name, "proxy.sock")
                  for name in os.listdir(self.runtime) if name.startswith("bw-claude.")]
        inode = listening_inode(path)
        self.assertIsNotNone(inode)
        self.assertEqual(holders(inode), [session.pid])
        [proxy] = interpreters_of(session.pid)
        with open(os.path.join(self.project, "go"), "w"):
            pass
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.project, "served")),
                                 30))
        self.assertEqual(holders(inode), [proxy])
        with open(os.path.join(self.project, "end"), "w"):
            pass
        out, err = self.finish(session)
        self.assertEqual(session.returncode, 0, err)
        self.assertIn("code=200", out)
        self.no_proxy_left()

    def test_a_session_killed_before_the_hand_does_not_weaken_another(self):
        """Session A waits before its hand; session B is SIGKILLed before its own; session C
        starts (sweeping B's directory) and ends: A's socket is still A's, its proxy starts
        at A's first connection and filters."""
        server = self.upstream()
        target = f"127.0.0.1:{server.port}"
        a = self.launched(self.HOLD, "--no-defaults", "--filter-network", *loopback(server),
                          "--shell", "--", "-c", after_go(
                              f"{get(target, 'a')}; {get('blocked.example', 'a_blocked')}", 400))
        self.assertTrue(wait_for(self.up, 30))
        os.unlink(os.path.join(self.project, "up"))
        b = self.launched(self.HOLD, "--no-defaults", "--filter-network", "--shell", "--", "-c",
                          ": > up; sleep 30")
        self.assertTrue(wait_for(self.up, 30))
        b_proxy = interpreters_of(b.pid)
        b.kill()
        b.communicate(timeout=30)
        self.assertTrue(wait_for(lambda: not any(map(alive, b_proxy)), 10))
        c = self.shell(get(target, "c"), "--no-defaults", "--filter-network", *loopback(server),
                       code=0)
        self.assertIn("c=200", c.stdout, c.stderr)
        self.assertEqual(len(interpreters_of(a.pid)), 1, "A's waiting proxy was stopped")
        with open(os.path.join(self.project, "go"), "w"):
            pass
        out, err = self.finish(a)
        self.assertEqual(a.returncode, 0, err)
        self.assertIn("a=200", out, err)
        self.assertIn("a_blocked=403", out, err)
        self.assertEqual(counts(network_lines(err)[0]), (1, 1), err)
        self.assertEqual(server.accepted, 2)
        self.no_proxy_left()


class SignalAtTheHandTest(HandCase):
    """A SIGTERM that lands the moment the socket is handed over (ProxyInterpreter.hand has
    returned, FilterProxy.hand has not): the session still ends with exactly one network
    line, and one that counts what the proxy served.  (On 4f111a7 neither marker of a
    started proxy was set in that window, and no line was said.)"""

    def signalled_session(self, speed, server):
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", LAUNCH_SIGNAL_AT_HAND, REPO, "60", speed,
             BW_CLAUDE, "--no-defaults", "--filter-network", *loopback(server), "--shell",
             "--", "-c", f"sleep 0.2; {get(f'127.0.0.1:{server.port}', 'code')}; sleep 10"],
            cwd=self.project, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        out, err = self.finish(process)
        self.assertEqual(process.returncode, 128 + signal.SIGTERM, err)
        return out, err

    # Failed on 4f111a7, mended: FilterProxy.hand set self.listener = None (finally) before
    # self.deadline; a Terminated raised in between left both None, and __exit__ then skipped
    # finish_start: no network line at all, unlike a SIGTERM at any other moment.
    def test_a_sigterm_at_the_hand_still_ends_with_a_network_line(self):
        server = self.upstream()
        out, err = self.signalled_session("fast", server)
        lines = network_lines(err)
        self.assertEqual(len(lines), 1, err)
        if server.accepted:
            self.assertNotIn("nothing went out", lines[0], err)
        self.no_proxy_left()

    # Failed on 4f111a7, mended: same window; with the sandbox slow to stop (stop_sandbox
    # runs before FilterProxy.__exit__), the handed proxy started, served the sandbox's
    # waiting request (the upstream was reached), and the session ended without any summary.
    def test_a_proxy_handed_as_a_sigterm_lands_is_never_left_out_of_the_summary(self):
        server = self.upstream()
        out, err = self.signalled_session("slow", server)
        time.sleep(0.3)
        lines = network_lines(err)
        self.assertGreater(server.accepted, 0,
                           "the setting did not reproduce: the proxy served nothing")
        self.assertEqual(len(lines), 1, f"the upstream was reached ({server.accepted}), "
                                        f"and the session said: {err}")
        self.assertGreaterEqual(counts(lines[0])[0], 1, err)
        self.no_proxy_left()


if __name__ == "__main__":
    unittest.main()
