"""What the sandbox tests share: the repository's scripts, skipping when a tool is missing,
sessions of the real wrapper in a temporary HOME with a fake CLI, names pinned to loopback,
small upstream servers on the host's loopback, and bounded polling and reading helpers.

No traffic leaves the machine: every upstream here listens on 127.0.0.0/8 only."""

import contextlib
import http.server
import json
import os
import pty
import select
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BW_CLAUDE = os.path.join(REPO, "bw-claude")
BW_GEMINI = os.path.join(REPO, "bw-gemini")
SCRIPTS = ("bw-claude", "bw-gemini")
LIBRARY = ("bw_lib.py", "socks_filter.py", "socat_bridge.sh")
IN_CI = os.environ.get("CI") == "true"

FAKE_CLI = """#!/bin/sh
# Fake CLI: answer --version as --doctor asks; else record the arguments in the project, then
# run the last one as a script.
[ "$1" = --version ] && echo "9.9.9 (Fake Code)" && exit 0
printf '%s\\n' "$@" > "$PWD/.fake-cli-args"
for script; do :; done
eval "$script"
"""

BODY = b"hello from the upstream\n"


# -- skipping ---------------------------------------------------------------------------------

def missing(reason):
    """Skip the test for a missing tool; under CI=true a missing tool is a failure."""
    if IN_CI:
        raise AssertionError(reason)
    raise unittest.SkipTest(reason)


def require_tools(*tools):
    for tool in tools:
        if not shutil.which(tool):
            missing(f"{tool} is not installed")


def require_sandbox(*tools):
    """Skip (fail under CI) unless bwrap and `tools` are installed and bwrap works here."""
    require_tools("bwrap", *tools)
    probe = subprocess.run(["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        missing(f"bwrap cannot create a sandbox here: {probe.stderr.strip()}")


# -- files, processes, terminals --------------------------------------------------------------

def write_file(path, text, mode=0o644):
    """Write `text` to `path` (its directories made), with `mode`; returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def read_text(path):
    """The text of `path`, or None when there is no such file."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def install_copy(directory):
    """Copy the entry scripts and the library into `directory`; the copied bw-claude."""
    os.makedirs(directory, exist_ok=True)
    for name in LIBRARY + SCRIPTS:
        shutil.copy2(os.path.join(REPO, name), os.path.join(directory, name))
    return os.path.join(directory, "bw-claude")


def temporary_root(test, prefix):
    """A new directory (its real path) for `test`, removed with all it holds after the test."""
    root = os.path.realpath(tempfile.mkdtemp(prefix=prefix))
    test.addCleanup(shutil.rmtree, root, True)
    return root


def make_session_dirs(test, prefix):
    """Give `test` a temporary root with home/, bin/, project/ and run/ (test.home, .bin,
    .project, .runtime), removed after the test."""
    test.root = temporary_root(test, prefix)
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


def run_in_pty(argv, cwd, env, started=None, key=b""):
    """Run argv with a new pseudo-terminal as its controlling terminal; once the file
    `started` exists, type `key`; read until the terminal closes.  (output, exit status)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(cwd)
        os.execve(argv[0], argv, env)
    output = b""
    for _ in range(600 if started else 0):
        if os.path.exists(started):
            os.write(fd, key)
            break
        if select.select([fd], [], [], 0.05)[0]:
            with contextlib.suppress(OSError):
                output += os.read(fd, 4096)
    output += read_pty(fd)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return output, os.waitstatus_to_exitcode(status)


def one_line(text):
    return text.strip() and "\n" not in text.strip() and "Traceback" not in text


def alive(pid):
    """Whether pid runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


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


def children(pid):
    """The pids whose parent is `pid` (from /proc)."""
    found = []
    for child in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{child}/stat") as f:
                if int(f.read().rpartition(")")[2].split()[1]) == pid:
                    found.append(int(child))
        except (OSError, ValueError, IndexError):
            continue
    return found


def command_line(pid):
    """Process `pid`'s command line, its arguments joined by spaces ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_mentioning(text):
    """Pids whose command line contains `text` (read from /proc, this user's view)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def read_log(path):
    """The proxy log's records; a half-written last line and a missing log are skipped."""
    records = []
    with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as f:
        for line in filter(None, map(str.strip, f)):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def decisions(records, host=None, port=None):
    return [r for r in records if r.get("event") == "decision"
            and (host is None or r.get("host") == host)
            and (port is None or r.get("port") == port)]


# -- upstreams on the host's loopback ---------------------------------------------------------

class Answers:
    """Mixed into a request handler: answer() sends a 200 with a body; nothing is logged."""

    def log_message(self, *args):
        pass

    def answer(self, body, content_type="text/plain"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class BodyHandler(Answers, http.server.BaseHTTPRequestHandler):
    """Answers every GET with BODY."""

    def do_GET(self):
        self.answer(BODY)


def http_server(cleanup, address="127.0.0.1", handler=BodyHandler):
    """A threaded HTTP server on `address`, any port, stopped through `cleanup` (a test's
    addCleanup or a class's addClassCleanup)."""
    server = http.server.ThreadingHTTPServer((address, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cleanup(server.server_close)
    cleanup(server.shutdown)
    return server


def fetch(hostport, how="", label="code"):
    """Shell: a curl through the proxy variables (how="-x $ALL_PROXY" for SOCKS) printing the
    body, then LABEL=HTTP status."""
    return (f"curl -sS --noproxy '' --max-time 10 {how} -w '\\n{label}=%{{http_code}}\\n' "
            f"http://{hostport}/")


class LoopbackUpstreams:
    """Mixed into a SessionCase (before it): two HTTP upstreams on the host's 127.0.0.2 and
    127.0.0.3 (loopback addresses, which the proxy treats as private); `one` and `two` are
    their HOST:PORT."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.servers = [http_server(cls.addClassCleanup, address)
                       for address in ("127.0.0.2", "127.0.0.3")]
        cls.one = "127.0.0.2:%d" % cls.servers[0].server_address[1]
        cls.two = "127.0.0.3:%d" % cls.servers[1].server_address[1]


NAME = "tls.bw-test.example"        # pinned to 127.0.0.1
LAN = "lan.bw-test.example"         # pinned to 10.1.2.3 (never connected to: refused first)
GONE = "gone.bw-test.example"       # not in the hosts file: the lookup fails (no DNS answers)
HOSTS = (f"127.0.0.1 localhost\n127.0.0.1 {NAME} api.anthropic.com claude.ai "
         f"raw.githubusercontent.com\n10.1.2.3 {LAN}\n")
RESOLV = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
PINNED = ('mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && '
          'exec "$@"')
ALERT = bytes.fromhex("15 03 01 00 02 01 5a")          # a TLS warning alert record
SSH_BANNER = b"SSH-2.0-fake_server\r\n"


class RecordingUpstream(socketserver.ThreadingTCPServer):
    """A TCP server on the host's 127.0.0.1: records what each connection sent; "ssh" mode
    first sends SSH_BANNER, "http" mode answers one request with `ok`."""

    daemon_threads = True
    request_queue_size = 16

    def __init__(self, mode="record"):
        super().__init__(("127.0.0.1", 0), RecordedConnection)
        self.mode, self.received, self.accepted = mode, [], 0
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, args=(0.2,), daemon=True).start()

    def verify_request(self, request, client_address):
        self.accepted += 1
        return True

    def stop(self):
        self.shutdown()
        self.server_close()


class RecordedConnection(socketserver.BaseRequestHandler):
    def handle(self):
        conn, mode, data = self.request, self.server.mode, b""
        conn.settimeout(3)
        try:
            if mode == "ssh":
                conn.sendall(SSH_BANNER)
            end = {"ssh": b"\r\n", "http": b"\r\n\r\n"}.get(mode)
            while end is None or end not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            if mode == "http" and data:
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        except OSError:
            pass
        self.server.received.append(data)


def loopback(server):
    """The IP rule that lets names pinned to 127.0.0.1 reach `server` (an IP rule is the one
    way to a loopback address; --allow-private opens only private-use networks)."""
    return ["--allow-domain", f"127.0.0.1:{server.port}"]


def tunnel(data_file, host, port, via="$HTTPS_PROXY"):
    """Shell: send a file's bytes through a proxy tunnel to host:port with real curl, print
    what came back (hex) and curl's status."""
    proxy = f'-p -x "{via}"' if via == "$HTTPS_PROXY" else f'-x "{via}"'
    return (f"curl -sS -m 8 {proxy} telnet://{host}:{port} < {data_file} | od -An -tx1 | "
            "tr -d ' \\n'; echo ' rc='$?")


def pinned_names(root, hosts=HOSTS):
    """The command prefix that runs a command under `unshare -rm` with a private /etc/hosts
    (`hosts`) and /etc/resolv.conf (a nameserver where nothing answers), both written to
    `root`; skips unless that works here."""
    paths = [write_file(os.path.join(root, name), text)
             for name, text in (("hosts", hosts), ("resolv.conf", RESOLV))]
    prefix = ["unshare", "-rm", "sh", "-c", PINNED, "sh", *paths]
    probe = subprocess.run(prefix + ["true"], capture_output=True, timeout=20)
    if probe.returncode != 0:
        missing("needs `unshare -rm` and `mount` for a private /etc/hosts: "
                + probe.stderr.decode(errors="replace").strip())
    return prefix


# -- sessions of the real wrapper -------------------------------------------------------------

class SessionCase(unittest.TestCase):
    """Runs the wrapper in a temporary root: home/ (HOME), bin/ (the fake CLI, first on PATH),
    project/ (the working directory) and run/ (XDG_RUNTIME_DIR), removed after the test.
    Skips unless bwrap works here and TOOLS are installed."""

    PREFIX = "bw-session-"
    TOOLS = ()
    PATH = "/usr/bin:/bin"

    @classmethod
    def setUpClass(cls):
        require_sandbox(*cls.TOOLS)

    def setUp(self):
        make_session_dirs(self, self.PREFIX)
        self.base = os.path.join(self.home, ".cache", "bw-claude")     # the sessions' homes
        self.fake_cli("claude")
        self.env = {"HOME": self.home, "PATH": f"{self.bin}:{self.PATH}", "LANG": "C.UTF-8",
                    "XDG_RUNTIME_DIR": self.runtime}

    def fake_cli(self, name):
        return write_file(os.path.join(self.bin, name), FAKE_CLI, 0o755)

    def write_home(self, relative, text, mode=0o644):
        return write_file(os.path.join(self.home, relative), text, mode)

    def read_home(self, relative):
        return read_text(os.path.join(self.home, relative))

    def bw(self, *argv, script=None, tool=BW_CLAUDE, env=None, cwd=None, prefix=(), timeout=120,
           **kwargs):
        """`[prefix] bw-claude ARGV [-- SCRIPT]` in the project (the fake CLI runs SCRIPT)."""
        command = [*prefix, sys.executable, tool, *argv] + (["--", script] if script is not None
                                                             else [])
        kwargs = {"capture_output": True, **kwargs}
        return subprocess.run(command, cwd=cwd or self.project, env=env or self.env, text=True,
                              timeout=timeout, **kwargs)

    def shell(self, script, *argv, code=None, **kwargs):
        """The agent's command, `bw-claude --shell ARGV -- -c SCRIPT`: never a traceback, and
        exit status `code` when one is given."""
        result = self.bw("--shell", *argv, "--", "-c", script, **kwargs)
        self.assertNotIn("Traceback", result.stderr)
        return result if code is None else self.check(result, code)

    def popen(self, *argv, tool=BW_CLAUDE, **kwargs):
        """The wrapper started in the project and left running (killed after the test)."""
        kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kwargs}
        process = subprocess.Popen([sys.executable, tool, *argv], cwd=self.project,
                                   env=self.env, **kwargs)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        return process

    def check(self, result, code=0):
        self.assertEqual(result.returncode, code,
                         f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def assert_refused(self, result, *words, ran="ran"):
        """The session did not start (`ran` is not in its output): a non-zero status and one
        line saying why, holding `words`."""
        self.assertNotEqual(result.returncode, 0, result.stderr)
        self.assertNotIn(ran, result.stdout)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        for word in words:
            self.assertIn(word, lines[0])

    def assert_clean(self):
        """No private directory and no process of the session is left."""
        self.assertEqual(os.listdir(self.runtime), [])
        self.assertEqual(processes_mentioning(self.runtime), [])

    def assert_all_gone(self):
        """No session directory is left: neither the socket's nor the home's."""
        self.assert_clean()
        self.assertEqual(os.listdir(self.base) if os.path.isdir(self.base) else [], [])


class PinnedCase(SessionCase):
    """Runs `bw-claude --no-defaults ... --proxy-log LOG --shell -- -c SCRIPT` with names
    pinned to loopback (see pinned_names: no lookup or connection leaves the machine)."""

    PREFIX = "bw-pinned-"
    TOOLS = ("socat", "curl", "unshare", "mount")

    def setUp(self):
        super().setUp()
        self.log = os.path.join(self.root, "proxy.jsonl")
        self.pinned = pinned_names(self.root)

    def upstream(self, mode="record"):
        server = RecordingUpstream(mode)
        self.addCleanup(server.stop)
        return server

    def put(self, name, data):
        """A file of bytes in the project, for tunnel()."""
        with open(os.path.join(self.project, name), "wb") as f:
            f.write(data)

    def filtered(self, *argv, script, pinned=True):
        result = self.bw("--no-defaults", *argv, "--proxy-log", self.log, "--shell", "--", "-c",
                         script, prefix=self.pinned if pinned else (), timeout=90)
        self.assertEqual(os.listdir(self.runtime), [], "the session left its directory")
        return result

    def decisions(self):
        return decisions(read_log(self.log))

    def summary(self, result):
        return [line for line in result.stderr.splitlines() if "network:" in line][-1]
