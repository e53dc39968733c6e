"""Attacks on the filter's start-up (issue 15): the wrapper binds the proxy's socket and hands
it over, bwrap starts without waiting for the proxy, the proxy's arguments come NUL-ended on
its stdin, the proxy exits with os._exit, programs start with posix_spawn.

The threat: the agent inside is hostile, another local user is hostile, sessions die with
kill -9.  The filter must never fail open and nothing may be left behind.  Every test runs
the real wrapper (or the real ProxyInterpreter) and asserts what reached an upstream, what
the proxy served, or what is left on the host.  Upstreams listen on the host's 127.0.0.1
only; no traffic leaves the machine.

Tests that need a second local user (RuntimeBaseTest, SocketPlaceTest) run only as root,
with setpriv, as `cloudsdk` when there is such a user, else `nobody`."""

import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import unittest

import bw_lib
from tests.sandbox_harness import (RecordingUpstream, SessionCase, children, command_line,
                                   decisions, processes_mentioning, read_log, read_text,
                                   wait_for, write_file)

OTHER_PYTHON = "/usr/bin/python3"     # one another user can run (sys.executable may be
                                      # under /root, e.g. pyenv)


def other_user():
    """(name, uid, gid) of the local user who attacks; skips unless we are root with setpriv."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(OTHER_PYTHON):
        raise unittest.SkipTest("needs root, setpriv and /usr/bin/python3 to act as another user")
    for name in ("cloudsdk", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return name, entry.pw_uid, entry.pw_gid
    raise unittest.SkipTest("no other local user")


def as_other(argv):
    name, uid, gid = other_user()
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]


def alive(pid):
    """Whether pid runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def many_rules(root, count=7000):
    """An allow file argparse takes about a second to read in the proxy (quadratic in the
    options): the sandbox is up well before the proxy serves."""
    path = os.path.join(root, "many-rules")
    with open(path, "w") as f:
        f.writelines(f"h{i}.example.com:443\n" for i in range(count))
    return path


def through_proxy(port, label):
    """Shell: a plain-HTTP GET of the host's 127.0.0.1:PORT through the sandbox's HTTP proxy."""
    return (f"curl -sS --noproxy '' -x \"$HTTP_PROXY\" -m 8 -o /dev/null "
            f"-w '{label}=%{{http_code}} %{{time_total}}\\n' http://127.0.0.1:{port}/")


# Run as another local user who can write the victim's runtime base: as soon as a session's
# socket directory appears there, move it away, put one of ours at its name holding a
# proxy.sock of ours, and relay whatever connects to it, unfiltered, to 127.0.0.1:PORT.
RACER = r"""
import os, socket, sys, threading, time
base, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + seconds
def relay(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
seen = set()
while time.monotonic() < deadline:
    names = [n for n in os.listdir(base) if n.startswith("bw-claude.") and n not in seen]
    if not names:
        time.sleep(0.0002)
        continue
    name = names[0]
    seen.add(name)
    try:
        os.rename(os.path.join(base, name), os.path.join(base, "moved-" + name))
        os.mkdir(os.path.join(base, name), 0o755)
        path = os.path.join(base, name, "proxy.sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen(16)
    except OSError as error:
        print("swap failed:", error, flush=True)
        continue
    print("planted", path, flush=True)
    def serve(server=server):
        while True:
            client, _ = server.accept()
            upstream = socket.create_connection(("127.0.0.1", port))
            threading.Thread(target=relay, args=(client, upstream), daemon=True).start()
            threading.Thread(target=relay, args=(upstream, client), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
"""


class RuntimeBaseTest(SessionCase):
    """The proxy's socket lives in the runtime base ($XDG_RUNTIME_DIR, else $TMPDIR or /tmp).
    When another local user can write that directory (root after `su` keeping a user's
    variables, a shared TMPDIR), the session's socket directory can be moved away and
    replaced between the wrapper's bind and bwrap's mount, which binds by path: the sandbox
    then talks to that user's socket, unfiltered, and the summary says nothing."""

    PREFIX = "bw-attack-base-"
    TOOLS = ("socat", "curl")

    def test_a_runtime_base_another_user_can_write_never_carries_the_sandbox_elsewhere(self):
        name, uid, gid = other_user()
        shared = os.path.realpath(tempfile.mkdtemp(prefix="bw-attack-shared-"))
        self.addCleanup(shutil.rmtree, shared, True)
        os.chmod(shared, 0o755)
        base = os.path.join(shared, "run")
        os.mkdir(base, 0o755)
        os.chown(base, uid, gid)        # theirs; traversable, as a shared TMPDIR would be
        racer_path = write_file(os.path.join(shared, "racer.py"), RACER, 0o644)
        server = RecordingUpstream("http")     # never allowed: no rule names it
        self.addCleanup(server.stop)
        racer = subprocess.Popen(as_other([OTHER_PYTHON, racer_path, base, str(server.port),
                                           "60"]),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(lambda: racer.poll() is None and racer.kill())
        env = {**self.env, "XDG_RUNTIME_DIR": base}
        outputs = []
        for _ in range(3):
            result = self.shell(through_proxy(server.port, "code"), "--no-defaults",
                                "--filter-network", env=env, timeout=60)
            outputs.append((result.returncode, result.stdout, result.stderr))
        racer.kill()
        said = racer.communicate(timeout=10)[0]
        # Either the wrapper refuses a runtime base that is not its own (the XDG spec: owned
        # by the user, mode 0700), or the sandbox's connections reach its own proxy only.
        self.assertEqual(server.accepted, 0,
                         f"a request the filter never allowed reached the upstream through "
                         f"another user's socket; racer: {said!r}; sessions: {outputs}")
        for code, out, err in outputs:
            self.assertNotIn("code=200", out, err)


class SocketPlaceTest(SessionCase):
    """The socket the wrapper binds: 0600 in a 0700 directory of ours, and another local user
    cannot connect to it while the session runs (the proxy serves no password then)."""

    PREFIX = "bw-attack-place-"
    TOOLS = ("socat", "curl")

    def test_another_user_cannot_reach_the_socket(self):
        other_user()
        os.chmod(self.root, 0o755)      # so that only the session's own modes stand in the way
        os.chmod(self.runtime, 0o755)
        session = self.popen("--no-defaults", "--filter-network", "--shell", "--", "-c",
                             ": > up; i=0; while [ ! -e done ] && [ $i -lt 300 ]; do "
                             "sleep 0.1; i=$((i+1)); done")
        try:
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.project, "up")),
                                     30))
            dirs = [n for n in os.listdir(self.runtime) if n.startswith("bw-claude.")]
            self.assertEqual(len(dirs), 1, os.listdir(self.runtime))
            directory = os.path.join(self.runtime, dirs[0])
            path = os.path.join(directory, "proxy.sock")
            info, dir_info = os.lstat(path), os.lstat(directory)
            self.assertEqual((info.st_mode & 0o7777, info.st_uid), (0o600, os.geteuid()))
            self.assertEqual((dir_info.st_mode & 0o7777, dir_info.st_uid),
                             (0o700, os.geteuid()))
            probe = subprocess.run(as_other([OTHER_PYTHON, "-c",
                                             "import socket, sys\n"
                                             "s = socket.socket(socket.AF_UNIX)\n"
                                             "s.settimeout(5)\n"
                                             "s.connect(sys.argv[1])\n"
                                             "s.sendall(b'\\x05\\x01\\x00')\n"
                                             "print('answer', s.recv(2))", path]),
                                   capture_output=True, text=True, timeout=30, cwd="/")
            self.assertNotEqual(probe.returncode, 0, probe.stdout)
            self.assertIn("PermissionError", probe.stderr)
        finally:
            write_file(os.path.join(self.project, "done"), "")
            session.communicate(timeout=60)
        self.assertEqual(session.returncode, 0)
        self.assert_clean()


class HandedArgumentsTest(unittest.TestCase):
    """hand(): the arguments come NUL-ended so that a proxy given fewer (the wrapper
    interrupted while writing them: a SIGTERM or SIGHUP raises Terminated inside sendall)
    refuses them.  A list cut right after a NUL is well-formed too: everything after the
    cut is missing, and what comes last is --token-env (--share-net's password), --log and
    --ready-fd.  Without --ready-fd nothing ever ends a proxy that missed its parent's death
    (exit_with_parent after the parent died sees init as its parent)."""

    def setUp(self):
        self.private = os.path.realpath(tempfile.mkdtemp(prefix="bw-attack-hand-"))
        self.addCleanup(shutil.rmtree, self.private, True)
        self.upstream = RecordingUpstream("http")
        self.addCleanup(self.upstream.stop)

    def test_arguments_cut_after_a_whole_argument_are_refused(self):
        path = os.path.join(self.private, "proxy.sock")
        err = os.path.join(self.private, "proxy.err")
        early = bw_lib.ProxyInterpreter({**os.environ, bw_lib.TOKEN_VARIABLE: "s3cret-token"})
        self.addCleanup(early.stop)
        listener = bw_lib.proxy_listener(path)
        whole = ["--listen", path, "--listen-fd", str(bw_lib.HANDED_LISTENER),
                 "--allow", f"127.0.0.1:{self.upstream.port}",
                 "--token-env", bw_lib.TOKEN_VARIABLE,
                 "--log", os.path.join(self.private, "proxy.jsonl"),
                 "--ready-fd", str(early.ready_number)]
        cut = whole[:6]        # what a signal after "--allow RULE\0" leaves: NUL-ended
        data = b"".join(os.fsencode(item) + b"\0" for item in [err, *cut])
        early.stdin.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      struct.pack("i", listener.fileno()))])
        early.stdin.close()
        listener.close()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            try:
                client.connect(path)
                client.sendall(b"\x05\x01\x00")            # SOCKS5, no authentication
                answer = client.recv(2)
                if answer == b"\x05\x00":
                    client.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                                   + struct.pack(">H", self.upstream.port))
                    client.recv(10)
                    client.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    client.recv(64)
            except OSError:
                answer = b""
        self.assertTrue(wait_for(lambda: early.process.poll() is not None, 10),
                        "a proxy given a cut argument list is serving")
        self.assertNotEqual(answer, b"\x05\x00", "it served without the session's password")
        self.assertEqual(self.upstream.accepted, 0)


class EarlyConnectionsTest(SessionCase):
    """Connections the sandbox makes before the proxy serves wait in the backlog of the
    socket the wrapper bound; they are decided by the full rule set once it serves."""

    PREFIX = "bw-attack-early-"
    TOOLS = ("socat", "curl")

    def test_connections_in_the_backlog_are_decided_by_every_rule(self):
        allowed, refused = RecordingUpstream("http"), RecordingUpstream("http")
        for server in (allowed, refused):
            self.addCleanup(server.stop)
        script = (f"{through_proxy(refused.port, 'refused')} & "
                  f"{through_proxy(allowed.port, 'allowed')} & "
                  f"curl -sS --noproxy '' -x \"$ALL_PROXY\" -m 8 -o /dev/null "
                  f"http://127.0.0.1:{refused.port}/ ; echo socks=$? ; wait")
        result = self.shell(script, "--no-defaults", "--filter-network", "--allow-file",
                            many_rules(self.root), "--allow-domain",
                            f"127.0.0.1:{allowed.port}", code=0)     # no --proxy-log:
        # with one the wrapper waits for the proxy before bwrap
        self.assertIn("refused=403", result.stdout, result.stderr)
        self.assertIn("allowed=200", result.stdout, result.stderr)
        self.assertNotIn("socks=0", result.stdout)
        waited = [float(line.split()[1]) for line in result.stdout.splitlines()
                  if line.startswith(("refused=", "allowed="))]
        self.assertTrue(all(t > 0.2 for t in waited), f"not made before the proxy served: "
                                                        f"{result.stdout}")
        self.assertEqual(refused.accepted, 0)
        self.assertEqual(allowed.accepted, 1)
        self.assertIn("1 allowed, 2 blocked", result.stderr)
        self.assert_clean()


class ProxyExitTest(SessionCase):
    """The proxy ends with os._exit: the log (and so the summary and --learn) must still
    hold every decision, made up to the very end of the session."""

    PREFIX = "bw-attack-exit-"
    TOOLS = ("socat", "curl")

    def test_every_decision_of_a_burst_at_the_end_is_counted(self):
        log = os.path.join(self.root, "proxy.jsonl")
        count = 40
        script = (f"i=0; while [ $i -lt {count} ]; do curl -s --noproxy '' -x \"$HTTP_PROXY\" "
                  "-m 5 -o /dev/null http://blocked-$i.example/ & i=$((i+1)); done; wait")
        result = self.shell(script, "--no-defaults", "--filter-network", "--proxy-log", log,
                            code=0)
        self.assertEqual(len(decisions(read_log(log))), count)
        self.assertIn(f"0 allowed, {count} blocked", result.stderr)
        server = RecordingUpstream("http")
        self.addCleanup(server.stop)
        learned = os.path.join(self.root, "learned.txt")
        self.shell(f"i=0; while [ $i -lt 20 ]; do curl -s --noproxy '' -x \"$ALL_PROXY\" -m 5 "
                   f"-o /dev/null http://127.0.0.1:{server.port}/ & i=$((i+1)); done; wait",
                   "--no-defaults", "--learn", learned, "--allow-domain",
                   f"127.0.0.1:{server.port}", code=0)
        self.assertEqual(server.accepted, 20)
        self.assertIn(f"127.0.0.1:{server.port}  # 20 connections", read_text(learned) or "",
                      "learn lost decisions")


class KilledWrapperTest(SessionCase):
    """kill -9 of the wrapper while the proxy is still reading its rules (the sandbox is up,
    the proxy not yet serving): the proxy does not outlive it, and the next start sweeps."""

    PREFIX = "bw-attack-kill-"
    TOOLS = ("socat", "curl")

    def test_the_proxy_does_not_outlive_a_wrapper_killed_before_it_serves(self):
        marker = os.path.join(self.project, "up")
        session = self.popen("--no-defaults", "--filter-network", "--allow-file",
                             many_rules(self.root, 9000), "--shell", "--", "-c",
                             ": > up; sleep 60")
        self.assertTrue(wait_for(lambda: os.path.exists(marker), 30))
        proxies = [pid for pid in children(session.pid) if "socks_filter" in command_line(pid)]
        self.assertEqual(len(proxies), 1, proxies)
        session.kill()
        session.communicate(timeout=30)
        self.assertTrue(wait_for(lambda: not alive(proxies[0]), 20),
                        "the proxy outlived the wrapper killed with SIGKILL")
        self.check(self.bw("--no-defaults", "--filter-network", "--shell", "--", "-c", "true"))
        self.assert_clean()


class SpawnedProxyDescriptorsTest(SessionCase):
    """posix_spawn: a descriptor the wrapper inherited (a directory: the whole filesystem
    to whoever holds it) reaches neither the proxy nor the sandbox."""

    PREFIX = "bw-attack-fds-"
    TOOLS = ("socat", "curl")

    def test_an_inherited_descriptor_reaches_neither_the_proxy_nor_the_sandbox(self):
        secret_dir = os.path.join(self.root, "secret")
        os.mkdir(secret_dir, 0o700)
        fd = os.open(secret_dir, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        script = (": > up; ls -l /proc/self/fd/ > fds.txt 2>&1; i=0; "
                  "while [ ! -e done ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done")
        session = self.popen("--no-defaults", "--filter-network", "--shell", "--", "-c",
                             script, pass_fds=(fd,))
        try:
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.project, "up"))))
            proxies = [pid for pid in children(session.pid) if "socks_filter" in command_line(pid)]
            self.assertEqual(len(proxies), 1)
            targets = []
            for entry in os.listdir(f"/proc/{proxies[0]}/fd"):
                try:
                    targets.append(os.readlink(f"/proc/{proxies[0]}/fd/{entry}"))
                except OSError:
                    continue
        finally:
            write_file(os.path.join(self.project, "done"), "")
            session.communicate(timeout=60)
        self.assertTrue(targets)
        self.assertNotIn(secret_dir, targets)
        self.assertNotIn(secret_dir, read_text(os.path.join(self.project, "fds.txt")))


class LeftoversCase(SessionCase):
    """Sessions whose sandbox may outlive the wrapper (StoppedWhileStartingTest): what they
    leave is found by the project in its command lines and killed after the test."""

    def setUp(self):
        super().setUp()
        self.addCleanup(self.end_leftovers)     # before the directories go

    def leftovers(self):
        """Live processes of this test's sessions (their command lines name the project)."""
        return [pid for pid in map(int, processes_mentioning(self.project)) if alive(pid)]

    def end_leftovers(self):
        """SIGKILL what the sessions left (ours): a sandbox's pid 1 takes the rest along."""
        for _ in range(50):
            left = self.leftovers()
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.1)

    def assert_nothing_left(self, what):
        wait_for(lambda: not self.leftovers(), 5)
        left = self.leftovers()
        self.assertEqual(left, [], f"{what}: processes left: "
                         + "; ".join(command_line(pid)[:60] for pid in left))


class RulesBeforeStartTest(LeftoversCase):
    """A rule the wrapper's check lets through must be one the proxy takes: otherwise the
    sandbox runs (without network) and the session then ends with the proxy's argparse
    message.  A label starting with '-' (not a valid host name either) is the case: the
    proxy's argparse takes `--allow -x.example.com` for an option without its value."""

    PREFIX = "bw-attack-rules-"

    def test_a_rule_with_a_leading_hyphen_is_refused_before_the_sandbox_starts(self):
        rules = write_file(os.path.join(self.root, "rules"), "-x.example.com\n")
        for argv in (["--allow-file", rules], ["--allow-domain=-x.example.com"]):
            with self.subTest(argv=argv):
                err_path = os.path.join(self.root, "stderr")
                with open(err_path, "w") as err:   # a file: a sandbox left running would
                    result = self.bw("--no-defaults", "--filter-network", *argv, "--shell",
                                     "--", "-c", ": > ran; sleep 3", capture_output=False,
                                     stdout=subprocess.DEVNULL, stderr=err)  # hold a pipe
                said = read_text(err_path)
                ran = os.path.exists(os.path.join(self.project, "ran"))
                if ran:
                    os.remove(os.path.join(self.project, "ran"))
                self.assertNotEqual(result.returncode, 0)
                self.assertFalse(ran, "the sandbox ran with a rule the proxy refuses: " + said)
                self.assertNotIn("expected one argument", said)


class LearnFromWritableLogTest(SessionCase):
    """--learn with a --proxy-log where the sandbox writes (the project): the learned allow
    list and the summary are read back from that file at the end, so they hold what the
    agent wrote there, not only what the proxy decided."""

    PREFIX = "bw-attack-learnlog-"

    def test_the_learned_list_holds_only_what_the_proxy_saw(self):
        # Mended by refusing a --proxy-log the sandbox can write: nothing runs, nothing is
        # learned.
        log = os.path.join(self.project, "proxy.jsonl")
        learned = os.path.join(self.root, "learned.txt")
        forged = ('{"ts":1,"event":"decision","id":7,"proto":"http-connect",'
                  '"host":"exfil.attacker.example","port":22,"decision":"allow",'
                  '"reason":"allowed","detail":"","mode":"audit","tunnel":"raw"}')
        result = self.shell(f"printf '%s\\n' '{forged}' >> proxy.jsonl; echo RAN",
                            "--no-defaults", "--learn", learned, "--proxy-log", log)
        self.assertNotIn("RAN", result.stdout)
        self.assertIn("--proxy-log", result.stderr)
        self.assertNotIn("exfil.attacker.example", read_text(learned) or "",
                         "the agent wrote a rule into the learned allow list")
        self.assertNotIn("1 allowed", result.stderr)


class StoppedWhileStartingTest(LeftoversCase):
    """bwrap starts without waiting for the proxy, so a session can now end (the proxy
    failed, a SIGTERM or SIGHUP) while bwrap is still setting the sandbox up; stop(bwrap)
    then SIGTERMs the outer bwrap before its child (pid 1 of the sandbox) is under
    --die-with-parent.  Nothing of the session may stay behind."""

    PREFIX = "bw-attack-stopped-"
    TOOLS = ("socat", "curl")

    def test_a_proxy_that_fails_at_once_leaves_no_sandbox_running(self):
        """The sandbox outlives the wrapper (in about one session in ten here; the
        wrapper has removed its placeholders (which detaches the sandbox's read-only mounts on them)
        and checked git, and the agent still runs: it writes the .mcp.json the session was
        kept from writing, whose command the unsandboxed CLI runs later)."""
        planted = os.path.join(self.project, ".mcp.json")
        script = ('i=0; while [ $i -lt 60 ]; do if (echo \'{"mcpServers":{"x":{"command":'
                  '"touch /tmp/pwned"}}}\' > .mcp.json) 2>/dev/null; then break; fi; '
                  'sleep 0.1; i=$((i+1)); done')
        for attempt in range(40):
            # Two ways to end a session while bwrap starts, in turn: a proxy that refuses
            # its arguments at once, and a SIGTERM as bwrap appears.  Not through pipes: a
            # sandbox left running holds them open for ever.
            if attempt % 2:
                self.bw("--no-defaults", "--filter-network", "--allow-domain=-x.example.com",
                        "--shell", "--", "-c", script, capture_output=False,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            else:
                self.terminated_as_bwrap_starts(script, attempt)
            if self.leftovers() or os.path.lexists(planted):
                break
        wait_for(lambda: os.path.lexists(planted), 3)
        self.assertFalse(os.path.lexists(planted),
                         f"session {attempt + 1}: the agent wrote .mcp.json after its session "
                         "ended: " + (read_text(planted) or ""))
        self.assert_nothing_left(f"after {attempt + 1} sessions whose proxy refused its "
                                 "arguments")

    def terminated_as_bwrap_starts(self, script, attempt):
        """A session SIGTERMed as soon as its bwrap runs (0-5 ms later)."""
        session = self.popen("--no-defaults", "--filter-network", "--shell", "--", "-c",
                             script, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                "bwrap" in command_line(pid).split(" ")[0] for pid in children(session.pid)):
            time.sleep(0.0005)
        time.sleep(0.001 * (attempt % 6))
        session.send_signal(signal.SIGTERM)
        session.wait(timeout=60)

    def test_a_signal_right_after_bwrap_starts_leaves_nothing_behind(self):
        for attempt in range(30):
            self.terminated_as_bwrap_starts("sleep 5", attempt)
            if self.leftovers():
                break
        self.assert_nothing_left(f"after {attempt + 1} sessions ended by SIGTERM as bwrap "
                                 "started")


if __name__ == "__main__":
    unittest.main()
