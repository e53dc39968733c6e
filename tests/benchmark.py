#!/usr/bin/env python3
"""Side-by-side benchmark of socks_filter.py, its socat bridge, and peer proxies.

Run from the repository root (Python 3.11 stdlib only; not part of the unit suite):

    python3 tests/benchmark.py                 # full run: 1 GiB bulk, 3 passes (about 6 minutes)
    python3 tests/benchmark.py --quick         # 64 MiB bulk, 2 passes, shorter rate test (1 minute)
    python3 tests/benchmark.py --setups direct,ours-unix,pproxy-unix --no-startup --json out.json
    python3 tests/benchmark.py --socks-filter /tmp/copy/socks_filter.py   # measure a modified copy
    python3 tests/benchmark.py --startup-only --startup-runs 21   # start-up only

It starts its own upstreams on 127.0.0.1, each in its own process: an HTTP source that answers
`GET /N` with N zero bytes (sendfile), and an echo server (epoll). Its client speaks SOCKS5 and
HTTP CONNECT over TCP or a unix socket. Setups:

    direct        no proxy; the client reads TCP straight from the source (a proxied path that
                  ends in a unix socket can come out faster: reading a unix socket costs less)
    ours-unix     socks_filter.py on a unix socket, SOCKS5 (started as bw_lib starts it, with --log)
    ours-http     the same, HTTP CONNECT (what Claude Code, Gemini CLI, npm and pip speak)
    ours-chain    socat with socat_bridge.sh's -b and -t (TCP -> unix socket) -> socks_filter.py
    pproxy-unix   `pproxy -l socks5:///PATH` (skipped when pproxy is not installed)
    pproxy-chain  socat with default settings -> pproxy on a unix socket
    microsocks    microsocks on TCP (skipped when not installed)
    sandbox       curl --proxytunnel through $HTTP_PROXY inside
                  `./bw-claude --shell --filter-network --unshare-net` (bulk only; skipped
                  without ./bw-claude)

Each pass starts fresh proxy processes for every setup (the order rotates from pass to pass so
drift hits all setups alike), and per setup runs, in this order:
  1. 500 simultaneous connections doing 100 echo round trips of 64 bytes each (client in its own
     process, on epoll); then the proxy's VmHWM, the peak RSS of a process started for this pass;
  2. bulk downloads, and the CPU time the setup's processes spent per GiB moved (utime+stime
     from /proc; for chains socat and its reaped forked workers count too);
  3. sequential connections for a fixed time: connect + handshake + 16-byte echo + close.
Then it times start-up (median wall time; the commands take turns, run after run, so that
drift hits all alike): `python3 -c pass` (the `python3` first on PATH, as the entry scripts
find it: run the benchmark with the PATH users have, and not through a pyenv shim, which costs
~100 ms by itself), the bwrap command bw-claude runs (read from --dry-run, its descriptors
replaced by paths), `bw-claude --shell -- -c true`, the same with --unshare-net and with
--filter-network (which implies --unshare-net), a filtered session making one request at once
(curl, to a name the proxy refuses before any lookup), with a fake `claude` on PATH, HOME in a
temporary directory, the current directory as the project and bytecode caches kept.  Its own
table gives each as milliseconds and as a multiple of `python3 -c pass` from the same run
(check_targets holds the targets).

Reading the table: one row per figure and setup with the median over passes (bulk: over all
runs; RSS: the largest), its ratio to `direct`, and its ratio to pproxy (`pproxy-chain` for
ours-chain, pproxy-chain and sandbox; `pproxy-unix` for the rest). The target and check
columns repeat the targets in check_targets. PASS/MISS is decided on this one run and loopback
figures move a lot with other load, so repeat a run before believing a miss; n/a means a
setup it compares with was not measured. MB/s counts 10^6 bytes per second.
"""

import argparse
import functools
import json
import multiprocessing
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BW_CLAUDE = os.path.join(REPO, "bw-claude")
MIB = 1 << 20
GIB = 1 << 30
CHUNK = 1 << 20           # client read size and sendfile slice
ECHO_CONNS = 500
ECHO_ROUNDS = 100
ECHO_SIZE = 64
RATE_PAYLOAD = b"0123456789abcdef"
SOCAT_BRIDGE = os.path.join(REPO, "socat_bridge.sh")
ALL_SETUPS = ["direct", "ours-unix", "ours-http", "ours-chain", "pproxy-unix", "pproxy-chain",
              "microsocks", "sandbox"]


class BenchError(Exception):
    """A setup could not start or a measurement failed; the message says why."""


# ---------------------------------------------------------------- small helpers

def parse_size(text):
    """'1G', '64M', '512k' or a plain byte count."""
    units = {"k": 1 << 10, "m": MIB, "g": GIB}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def wait_for(predicate, timeout, what):
    """Poll predicate() until true; bounded so a dead peer fails fast instead of hanging."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise BenchError(f"timed out after {timeout:g} s waiting for {what}")


def free_port():
    """A free loopback port for tools that cannot report the one they picked."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_listening(port):
    """True when some socket listens on 127.0.0.1:port (read from /proc: no test connection)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(line.split()[1] == want and line.split()[3] == "0A" for line in list(f)[1:])


def unix_accepting(path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(path)
        return True
    except OSError:
        return False


def read_line(fd, timeout):
    """One line from a pipe (the proxy's --ready-fd), or what came before EOF or the timeout."""
    line = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            if sel.select(max(0.0, deadline - time.monotonic())):
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                line += chunk
    return line


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise BenchError(f"peer closed after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def recv_headers(sock):
    """Read up to the end of an HTTP header; returns (header, bytes after it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data or len(buf) > 65536:
            raise BenchError(f"bad HTTP reply: {buf[:200]!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def proc_cpu_seconds(pid):
    """utime+stime of pid plus its reaped children (socat's forked workers end up there)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def vm_hwm_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM for pid {pid}")


def has_children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return bool(f.read().strip())
    except OSError:
        return False


def default_signals():
    """In forked children: die on SIGINT/SIGTERM instead of running the parent's cleanup."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def bridge_socat_options():
    """socat's -b and -t as socat_bridge.sh sets them, so ours-chain follows the real bridge."""
    options = {"-b": "262144", "-t": "3600"}
    try:
        with open(SOCAT_BRIDGE) as f:
            text = f.read()
    except OSError:
        text = ""
    for flag in options:
        found = re.search(rf"\s{flag}\s+([0-9.]+)\s", text)
        if found:
            options[flag] = found.group(1)
    return [word for pair in options.items() for word in pair]


def median(values):
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- process registry

class Processes:
    """Every process the benchmark starts, so that any exit path (Ctrl-C too) can end them."""

    def __init__(self):
        self.items = []

    def spawn(self, cmd, **kwargs):
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, **kwargs)
        self.items.append(proc)
        return proc

    def fork(self, target, *args):
        proc = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
        proc.start()
        self.items.append(proc)
        return proc

    def stop(self, proc, timeout=5):
        if isinstance(proc, subprocess.Popen):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
        else:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout)
        if proc in self.items:
            self.items.remove(proc)

    def stop_all(self):
        for proc in reversed(list(self.items)):
            self.stop(proc)


PROCS = Processes()


# ---------------------------------------------------------------- upstreams (own processes)

def source_server(listener, zeros_path):
    """HTTP source: `GET /N` answers N zero bytes via sendfile, one thread per connection."""
    default_signals()
    fd = os.open(zeros_path, os.O_RDONLY)
    file_size = os.fstat(fd).st_size

    def serve(conn):
        with conn:
            try:
                head, _ = recv_headers(conn)
                count = int(head.split(b" ")[1].strip(b"/"))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % count)
                left = count
                while left:
                    sent = os.sendfile(conn.fileno(), fd, (count - left) % file_size,
                                       min(left, CHUNK, file_size - (count - left) % file_size))
                    if sent == 0:
                        return
                    left -= sent
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(30)
                while conn.recv(65536):    # wait for the client's close so no RST cuts the tail
                    pass
            except (OSError, ValueError, IndexError, BenchError):
                pass

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def echo_server(listener):
    """Echo server on epoll: one process, cheap per message, so it is not what limits a proxy."""
    default_signals()
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)
    pending = {}

    def close(conn):
        sel.unregister(conn)
        pending.pop(conn, None)
        conn.close()

    while True:
        for key, events in sel.select():
            conn = key.fileobj
            if conn is listener:
                try:
                    while True:
                        new, _ = listener.accept()
                        new.setblocking(False)
                        new.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        sel.register(new, selectors.EVENT_READ)
                except BlockingIOError:
                    pass
                continue
            try:
                if events & selectors.EVENT_WRITE:
                    data = pending.pop(conn)
                    sent = conn.send(data)
                    if sent < len(data):
                        pending[conn] = data[sent:]
                    else:
                        sel.modify(conn, selectors.EVENT_READ)
                    continue
                data = conn.recv(65536)
                if not data:
                    close(conn)
                    continue
                sent = conn.send(data)
                if sent < len(data):
                    pending[conn] = data[sent:]
                    sel.modify(conn, selectors.EVENT_WRITE)
            except BlockingIOError:
                pass
            except OSError:
                close(conn)


class Upstreams:
    def __init__(self, workdir):
        zeros = os.path.join(workdir, "zeros")
        with open(zeros, "wb") as f:
            f.write(bytes(64 * MIB))
        self.source_port = self._start(source_server, zeros)
        self.echo_port = self._start(echo_server)

    @staticmethod
    def _start(target, *args):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        PROCS.fork(target, listener, *args)
        port = listener.getsockname()[1]
        listener.close()
        return port


# ---------------------------------------------------------------- setups

class Setup:
    """One way to reach the upstreams. start() brings up fresh processes; stop() ends them."""

    proto = "socks5"        # client handshake; None = connect straight to the target
    peer = "pproxy-unix"    # what the "x pproxy" column compares with

    def __init__(self, name, workdir):
        self.name = name
        self.workdir = workdir
        self.procs = []           # processes whose CPU counts as the setup's
        self.proxy = None         # the process whose RSS is reported
        self.endpoint = None      # ("unix", path) or ("tcp", (host, port))

    def available(self):
        """None when the setup can run here, else the reason to skip it."""
        return None

    def start(self):
        pass

    def stop(self):
        for proc in reversed(self.procs):
            PROCS.stop(proc)
        self.procs = []
        self.proxy = None

    def await_tcp(self, proc, port, name):
        """Wait (bounded) until `proc` listens on 127.0.0.1:port; it becomes the endpoint."""
        wait_for(lambda: tcp_listening(port) or proc.poll() is not None, 10, f"{name} to listen")
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}")
        self.endpoint = ("tcp", ("127.0.0.1", port))

    def cpu_seconds(self):
        """CPU of the setup's processes, after socat's forked workers have exited and been reaped."""
        if not self.procs:
            return None
        for proc in self.procs:
            wait_for(lambda: not has_children(proc.pid), 10, f"{self.name}: forked workers to exit")
        return sum(proc_cpu_seconds(proc.pid) for proc in self.procs)

    def _log(self, what):
        return open(os.path.join(self.workdir, f"{self.name}.{what}.log"), "ab")

    def _socat(self, options, unix_path):
        port = free_port()
        with self._log("socat") as err:
            proc = PROCS.spawn(["socat", *options,
                                f"TCP4-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                                f"UNIX-CONNECT:{unix_path}"], stdout=subprocess.DEVNULL, stderr=err)
        self.procs.append(proc)
        self.await_tcp(proc, port, "socat")


class Direct(Setup):
    proto = None


class Ours(Setup):
    """socks_filter.py started the way bw_lib starts it (with a JSON log), on a unix socket."""

    script = os.path.join(REPO, "socks_filter.py")   # --socks-filter replaces it

    def __init__(self, name, workdir, proto="socks5", chain=False):
        super().__init__(name, workdir)
        self.proto = proto
        self.chain = chain
        if chain:
            self.peer = "pproxy-chain"

    def available(self):
        return None if os.path.exists(self.script) else f"{self.script} not found"

    def start(self):
        path = os.path.join(self.workdir, f"{self.name}.sock")
        read_fd, write_fd = os.pipe()
        try:
            try:
                with self._log("proxy") as err:
                    self.proxy = PROCS.spawn([sys.executable, self.script, "--listen", path,
                                              "--allow", "127.0.0.1",
                                              "--log", os.path.join(self.workdir, f"{self.name}.json"),
                                              "--ready-fd", str(write_fd)],
                                             pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=err)
                self.procs.append(self.proxy)
            finally:
                os.close(write_fd)
            line = read_line(read_fd, 15)
        finally:
            os.close(read_fd)
        if not line.startswith(b"ready"):
            raise BenchError(f"socks_filter.py did not report ready (got {line!r}); "
                             f"see {self.workdir}/{self.name}.proxy.log")
        if self.chain:
            self._socat(bridge_socat_options(), path)
        else:
            self.endpoint = ("unix", path)


@functools.cache
def pproxy_command():
    """Run the module with our interpreter so the pid is pproxy's own, not a launcher's."""
    if subprocess.run([sys.executable, "-c", "import pproxy"], capture_output=True).returncode == 0:
        return [sys.executable, "-m", "pproxy"]
    found = shutil.which("pproxy")
    return [found] if found else None


class Pproxy(Setup):
    """pproxy, the plain-asyncio peer, on a unix socket (and behind default socat for the chain)."""

    def __init__(self, name, workdir, chain=False):
        super().__init__(name, workdir)
        self.chain = chain
        if chain:
            self.peer = "pproxy-chain"

    def available(self):
        return None if pproxy_command() else "pproxy not installed (pip install pproxy)"

    def start(self):
        path = os.path.join(self.workdir, f"{self.name}.sock")
        with self._log("proxy") as log:
            proc = PROCS.spawn([*pproxy_command(), "-l", f"socks5://{path}"], stdout=log, stderr=log)
        self.procs.append(proc)
        self.proxy = proc
        wait_for(lambda: unix_accepting(path) or proc.poll() is not None, 15, "pproxy to listen")
        if proc.poll() is not None:
            raise BenchError(f"pproxy exited with {proc.returncode}")
        if self.chain:
            self._socat([], path)
        else:
            self.endpoint = ("unix", path)


class Microsocks(Setup):
    def available(self):
        return None if shutil.which("microsocks") else "microsocks not installed (apt-get install microsocks)"

    def start(self):
        port = free_port()
        with self._log("proxy") as log:
            proc = PROCS.spawn(["microsocks", "-i", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
        self.procs.append(proc)
        self.proxy = proc
        self.await_tcp(proc, port, "microsocks")


class Sandbox(Setup):
    """curl inside bw-claude --filter-network: the whole path a user's download takes."""

    proto = None
    peer = "pproxy-chain"

    def available(self):
        if not os.access(BW_CLAUDE, os.X_OK):
            return f"{BW_CLAUDE} not found"
        if not shutil.which("curl"):
            return "curl not installed"
        return None

    def bulk(self, env, source_port, nbytes, runs, timeout):
        """MB/s of each of `runs` curl downloads made inside one sandbox (start-up not counted)."""
        curl = ('curl -sS --noproxy "" --proxy "$HTTP_PROXY" --proxytunnel -o /dev/null '
                f'-w "%{{size_download}} %{{time_total}}\\n" http://127.0.0.1:{source_port}/{nbytes}')
        script = f"for i in $(seq {runs}); do {curl} || exit 1; done"
        cmd = [BW_CLAUDE, "--shell", "--filter-network", "--unshare-net",
               "--allow-domain", f"127.0.0.1:{source_port}", "--", "-c", script]
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"sandbox: timed out after {timeout:g} s: {shlex.join(cmd)}")
        rates = []
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) == nbytes:
                rates.append(nbytes / float(parts[1]) / 1e6)
        if out.returncode != 0 or len(rates) != runs:
            raise BenchError(f"sandbox: exit {out.returncode}, {len(rates)} of {runs} downloads; "
                             f"stderr: {out.stderr.strip()[-500:]}")
        return rates


def make_setups(names, workdir):
    factories = {
        "direct": lambda: Direct("direct", workdir),
        "ours-unix": lambda: Ours("ours-unix", workdir),
        "ours-http": lambda: Ours("ours-http", workdir, proto="http"),
        "ours-chain": lambda: Ours("ours-chain", workdir, chain=True),
        "pproxy-unix": lambda: Pproxy("pproxy-unix", workdir),
        "pproxy-chain": lambda: Pproxy("pproxy-chain", workdir, chain=True),
        "microsocks": lambda: Microsocks("microsocks", workdir),
        "sandbox": lambda: Sandbox("sandbox", workdir),
    }
    return [factories[name]() for name in names]


# ---------------------------------------------------------------- client

def open_tunnel(setup, port, timeout=10):
    """A connected socket to 127.0.0.1:port through the setup's proxy (handshake done)."""
    if setup.endpoint is None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    else:
        kind, address = setup.endpoint
        sock = socket.socket(socket.AF_UNIX if kind == "unix" else socket.AF_INET)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            if setup.proto == "socks5":
                socks5_connect(sock, port)
            else:
                http_connect(sock, port)
        except BaseException:
            sock.close()
            raise
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def socks5_connect(sock, port):
    """Two round trips, as curl does: no-auth greeting, then CONNECT to 127.0.0.1:port."""
    sock.sendall(b"\x05\x01\x00")
    if recv_exact(sock, 2) != b"\x05\x00":
        raise BenchError("SOCKS5 greeting refused")
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big"))
    reply = recv_exact(sock, 4)
    if reply[1] != 0:
        raise BenchError(f"SOCKS5 CONNECT refused, reply code {reply[1]}")
    rest = {1: 6, 4: 18}.get(reply[3])
    if rest is None:
        rest = recv_exact(sock, 1)[0] + 2
    recv_exact(sock, rest)


def http_connect(sock, port):
    sock.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port))
    head, rest = recv_headers(sock)
    if head.split(b" ", 2)[1:2] != [b"200"] or rest:
        raise BenchError(f"HTTP CONNECT refused: {head[:200]!r}")


def bulk_once(setup, source_port, nbytes):
    """MB/s of one download of nbytes, timed from connect to the last byte."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    start = time.perf_counter()
    with open_tunnel(setup, source_port, timeout=60) as sock:
        sock.sendall(b"GET /%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % nbytes)
        _, body = recv_headers(sock)
        got = len(body)
        while got < nbytes:
            n = sock.recv_into(view)
            if n == 0:
                raise BenchError(f"{setup.name}: download ended after {got} of {nbytes} bytes")
            got += n
    return nbytes / (time.perf_counter() - start) / 1e6


def connection_rate(setup, echo_port, seconds, limit=200000):
    """Sequential connect + handshake + one 16-byte echo + close, per second."""
    count = 0
    start = time.perf_counter()
    while count < limit and time.perf_counter() - start < seconds:
        with open_tunnel(setup, echo_port) as sock:
            sock.sendall(RATE_PAYLOAD)
            if recv_exact(sock, len(RATE_PAYLOAD)) != RATE_PAYLOAD:
                raise BenchError(f"{setup.name}: echo mismatch")
        count += 1
    return count / (time.perf_counter() - start)


def echo_storm_client(setup, echo_port, conns, rounds, timeout, result_pipe):
    """Child process: open `conns` tunnels, then run the round trips on all at once with epoll."""
    default_signals()
    try:
        socks = [open_tunnel(setup, echo_port) for _ in range(conns)]
        payload = b"x" * ECHO_SIZE
        sel = selectors.DefaultSelector()
        left = [rounds] * conns
        got = [0] * conns
        sent_at = [0.0] * conns
        rtts = []
        start = time.perf_counter()
        for i, sock in enumerate(socks):
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, i)
            sent_at[i] = time.perf_counter()
            sock.send(payload)
        done = 0
        deadline = start + timeout
        while done < conns:
            if time.perf_counter() > deadline:
                raise BenchError(f"echo test unfinished after {timeout:g} s ({done} of {conns} done)")
            for key, _ in sel.select(1):
                i = key.data
                data = key.fileobj.recv(65536)
                if not data:
                    raise BenchError("echo connection closed early")
                got[i] += len(data)
                if got[i] < ECHO_SIZE:
                    continue
                now = time.perf_counter()
                rtts.append(now - sent_at[i])
                got[i] -= ECHO_SIZE
                left[i] -= 1
                if left[i]:
                    sent_at[i] = now
                    key.fileobj.send(payload)
                else:
                    sel.unregister(key.fileobj)
                    done += 1
        total = time.perf_counter() - start
        for sock in socks:
            sock.close()
        rtts.sort()
        result_pipe.send({"total_s": total, "p50_ms": rtts[len(rtts) // 2] * 1000,
                          "p99_ms": rtts[int(len(rtts) * 0.99)] * 1000})
    except Exception as exc:
        result_pipe.send({"error": f"{type(exc).__name__}: {exc}"})


def echo_storm(setup, echo_port, timeout=120):
    parent, child = multiprocessing.get_context("fork").Pipe(duplex=False)
    proc = PROCS.fork(echo_storm_client, setup, echo_port, ECHO_CONNS, ECHO_ROUNDS, timeout, child)
    child.close()
    try:
        if not parent.poll(timeout + 30):
            raise BenchError(f"{setup.name}: echo client gave no result")
        result = parent.recv()
    except EOFError:
        raise BenchError(f"{setup.name}: echo client died")
    finally:
        PROCS.stop(proc)
        parent.close()
    if "error" in result:
        raise BenchError(f"{setup.name}: {result['error']}")
    return result


# ---------------------------------------------------------------- running

def measure_pass(setup, upstreams, args, results, sandbox_env):
    """One pass of one setup on freshly started processes; appends to results[setup.name]."""
    figures = results[setup.name]
    if isinstance(setup, Sandbox):
        figures["bulk_mbps"] += setup.bulk(sandbox_env, upstreams.source_port, args.bytes,
                                           args.bulk_runs, timeout=60 + args.bulk_runs * args.bytes / 20e6)
        return
    setup.start()
    try:
        echo = echo_storm(setup, upstreams.echo_port)
        figures["echo_total_s"].append(echo["total_s"])
        figures["echo_p50_ms"].append(echo["p50_ms"])
        figures["echo_p99_ms"].append(echo["p99_ms"])
        if setup.proxy:
            figures["peak_rss_mib"].append(vm_hwm_mib(setup.proxy.pid))
        cpu_before = setup.cpu_seconds()
        for _ in range(args.bulk_runs):
            figures["bulk_mbps"].append(bulk_once(setup, upstreams.source_port, args.bytes))
        if cpu_before is not None:
            cpu = setup.cpu_seconds() - cpu_before
            figures["cpu_s_per_gib"].append(cpu / (args.bytes * args.bulk_runs / GIB))
        figures["conn_per_s"].append(connection_rate(setup, upstreams.echo_port, args.rate_seconds))
    finally:
        setup.stop()


def fake_cli_env(workdir):
    """Environment for bw-claude runs: a fake `claude` first on PATH and a throwaway HOME."""
    bindir = os.path.join(workdir, "bin")
    home = os.path.join(workdir, "home")
    os.makedirs(bindir, exist_ok=True)
    os.makedirs(home, exist_ok=True)
    fake = os.path.join(bindir, "claude")
    with open(fake, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(fake, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PATH=bindir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"), HOME=home)
    return env


def used_home(home, project):
    """Fill `home` with the CLI state of someone who uses Claude Code daily, in a small way:
    ~/.claude.json with 40 projects, a prompt history of 3,000 lines (one in ten of this
    project), five transcripts of this project (1 MB), settings and credentials."""
    claude = os.path.join(home, ".claude")
    slug = "".join(c if c.isascii() and c.isalnum() else "-" for c in project)
    os.makedirs(os.path.join(claude, "projects", slug), exist_ok=True)
    others = [f"/home/user/src/project{i}" for i in range(40)]
    state = {"numStartups": 120, "userID": "0" * 64, "cachedChangelog": "c" * 20000,
             "tipsHistory": {f"tip{i}": i for i in range(50)},
             "projects": {p: {"allowedTools": [], "lastCost": 0.5} for p in others + [project]}}
    files = {os.path.join(home, ".claude.json"): json.dumps(state, indent=2),
             os.path.join(claude, "settings.json"): json.dumps({"model": "opus"}),
             os.path.join(claude, ".credentials.json"): json.dumps(
                 {"claudeAiOauth": {"accessToken": "a" * 100, "refreshToken": "r" * 100}}),
             os.path.join(claude, "history.jsonl"): "".join(
                 json.dumps({"display": "make the tests pass " * 4, "pastedContents": {},
                             "timestamp": 1700000000000 + i,
                             "project": project if i % 10 == 0 else others[i % 40]}) + "\n"
                 for i in range(3000))}
    for n in range(5):
        files[os.path.join(claude, "projects", slug, f"{n:08x}-0000-4000-8000-000000000000.jsonl")] = \
            "".join(json.dumps({"type": "assistant", "uuid": str(i), "message": {"content": "x" * 500}})
                    + "\n" for i in range(400))
    for path, text in files.items():
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)


def time_command(cmd, env, runs, timeout=60):
    """Median wall seconds of `runs` runs of cmd, which must succeed.  A bwrap `--file PATH
    DEST` gets PATH opened afresh for each run (bwrap reads its descriptor to the end)."""
    times = []
    for _ in range(runs):
        fds, run = [], list(cmd)
        for i, word in enumerate(cmd[:-2]):
            if word == "--file" and not cmd[i + 1].isdigit():
                fds.append(os.open(cmd[i + 1], os.O_RDONLY))
                run[i + 1] = str(fds[-1])
        start = time.perf_counter()
        try:
            out = subprocess.run(run, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                 timeout=timeout, pass_fds=fds)
        finally:
            for fd in fds:
                os.close(fd)
        times.append(time.perf_counter() - start)
        if out.returncode != 0:
            raise BenchError(f"exit {out.returncode}: {shlex.join(cmd)}: {out.stderr.decode(errors='replace')[-400:]}")
    return statistics.median(times)


def bare_bwrap_command(base, env):
    """The bwrap command bw-claude runs for `base` (read from --dry-run), without the parts that
    need a live session (--seccomp FD, binds of paths the dry run does not create); a minimal
    bwrap with the same namespaces when that cannot be read."""
    fallback = ["bwrap", "--die-with-parent", "--unshare-all", "--ro-bind", "/usr", "/usr",
                "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64",
                "/lib64", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "/bin/sh", "-c", "true"]
    dry = subprocess.run([base[0], "--dry-run", *base[1:]], env=env, capture_output=True, text=True, timeout=30)
    for line in dry.stdout.splitlines():
        words = shlex.split(line)
        start = next((i for i, w in enumerate(words) if os.path.basename(w) == "bwrap"), None)
        if start is None:
            continue
        cmd, args, i = [words[start]], words[start + 1:], 0
        while i < len(args):
            if args[i] == "--":
                cmd += args[i:]
                break
            if args[i] in ("--seccomp", "--json-status-fd"):
                i += 2
            elif args[i] == "--file":                   # copied from a descriptor: its path
                cmd += ["--file", args[i + 2], args[i + 2]]
                i += 3
            elif args[i] in ("--bind-fd", "--ro-bind-fd"):    # bound from a checked descriptor
                if os.path.exists(args[i + 2]):
                    cmd += [args[i].removesuffix("-fd"), args[i + 2], args[i + 2]]
                i += 3
            elif args[i] in ("--bind", "--ro-bind", "--dev-bind") and not os.path.exists(args[i + 1]):
                i += 3
            else:
                cmd.append(args[i])
                i += 1
        return cmd
    return fallback


STARTUP_COMMANDS = [  # key, label, bw-claude's arguments (None: python3 -c pass, the bare bwrap)
    ("python_ms", "python3 -c pass", None),
    ("bwrap_bare_ms", "bare bwrap (bw-claude's mounts)", None),
    ("shell_ms", "bw-claude --shell -- -c true", ["--shell", "--", "-c", "true"]),
    ("shell_unshare_ms", "  ... --unshare-net", ["--shell", "--unshare-net", "--", "-c", "true"]),
    ("shell_filter_ms", "  ... --filter-network", ["--shell", "--filter-network", "--", "-c", "true"]),
    ("shell_used_ms", "  ... in a used home (used_home)", ["--shell", "--", "-c", "true"]),
    # One request at once: the proxy starts only when a connection waits (or after
    # PROXY_HAND_SECONDS), so this is the price of that.  A name the proxy refuses before any
    # lookup: nothing leaves the machine.  Measured only where curl is installed.
    ("shell_request_ms", "  ... --filter-network, a request at once",
     ["--shell", "--filter-network", "--", "-c", "curl -s -o /dev/null http://blocked.example/"]),
]


def measure_startup(env, runs):
    """Start-up medians in ms (STARTUP_COMMANDS), the commands taking turns run after run."""
    if not os.access(BW_CLAUDE, os.X_OK):
        return {"skipped": f"{BW_CLAUDE} not found"}
    if not shutil.which("bwrap"):
        return {"skipped": "bwrap not installed"}
    # Measure what a user's machine does: Python keeps its bytecode caches (some shells here
    # export PYTHONDONTWRITEBYTECODE=1, which would make every start compile bw_lib anew).
    env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    python = shutil.which("python3", path=env["PATH"])
    result = {"python3": python}
    try:
        commands = {}
        for key, _, args in STARTUP_COMMANDS:
            if key != "shell_request_ms" or shutil.which("curl", path=env["PATH"]):
                commands[key] = [BW_CLAUDE, *args] if args else [python, "-c", "pass"]
        commands["bwrap_bare_ms"] = bare_bwrap_command(commands["shell_ms"], env)
        result["bwrap_command"] = shlex.join(commands["bwrap_bare_ms"])
        envs = {key: env for key in commands}
        envs["shell_used_ms"] = {**env, "HOME": env["HOME"] + "-used"}
        used_home(envs["shell_used_ms"]["HOME"], os.getcwd())
        times = {key: [] for key in commands}
        for key, cmd in commands.items():         # creates the fake home's state, warms caches
            time_command(cmd, envs[key], 1)
        for _ in range(runs):
            for key, cmd in commands.items():
                times[key].append(time_command(cmd, envs[key], 1) * 1000)
    except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
        return {"skipped": str(exc), **result}
    result.update((key, statistics.median(values)) for key, values in times.items())
    result["filter_added_ms"] = result["shell_filter_ms"] - result["shell_ms"]
    return result


# ---------------------------------------------------------------- report

FIGURES = [  # key, label, format
    ("bulk_mbps", "bulk MB/s", "{:.0f}"),
    ("cpu_s_per_gib", "proxy CPU s/GiB", "{:.2f}"),
    ("conn_per_s", "connections/s", "{:.0f}"),
    ("echo_total_s", "500x100 echo total s", "{:.2f}"),
    ("echo_p50_ms", "500x100 echo p50 ms", "{:.2f}"),
    ("echo_p99_ms", "500x100 echo p99 ms", "{:.2f}"),
    ("peak_rss_mib", "proxy peak RSS MiB", "{:.1f}"),
]

# (figure, setup, [(">=" or "<=", factor, reference setup or None for an absolute bound)])
TARGETS = [
    ("bulk_mbps", "ours-unix", [(">=", 0.5, "direct"), (">=", 2.5, "pproxy-unix")]),
    ("bulk_mbps", "ours-chain", [(">=", 0.3, "direct"), (">=", 2.0, "pproxy-chain")]),
    ("conn_per_s", "ours-unix", [(">=", 1.5, "pproxy-unix"), (">=", 1.0, "microsocks")]),
    ("echo_p99_ms", "ours-unix", [("<=", 1.0, "pproxy-unix")]),
    ("peak_rss_mib", "ours-unix", [("<=", 30.0, None)]),
    ("cpu_s_per_gib", "ours-unix", [("<=", 0.5, "pproxy-unix")]),
    ("shell_ms", "startup", [("<=", 3.0, "python3")]),
    ("filter_added_ms", "startup", [("<=", 1.5, "python3"), ("<=", 100.0, None)]),
]


def summarize(results):
    """Per setup and figure: the median over passes, but the largest peak RSS."""
    summary = {}
    for name, figures in results.items():
        summary[name] = {key: (max(values) if key == "peak_rss_mib" else median(values))
                         for key, values in figures.items() if values}
    return summary


def check_targets(summary, startup):
    """[(figure, setup, target text, 'PASS'|'MISS'|'n/a', [part results])]."""
    values = dict(summary)
    values["startup"] = {k: v for k, v in startup.items() if isinstance(v, float)}
    if "python_ms" in startup:       # start-up targets are multiples of `python3 -c pass`
        values["python3"] = dict.fromkeys(values["startup"], startup["python_ms"])
    checks = []
    for figure, setup, parts in TARGETS:
        texts, outcomes = [], []
        value = values.get(setup, {}).get(figure)
        for op, factor, ref in parts:
            texts.append(f"{op}{factor:g}" + (f"x {ref}" if ref else ""))
            bound = factor if ref is None else (values.get(ref, {}).get(figure))
            if value is None or bound is None:
                outcomes.append(None)
                continue
            bound = bound * factor if ref else bound
            outcomes.append(value >= bound if op == ">=" else value <= bound)
        status = "MISS" if False in outcomes else ("n/a" if None in outcomes else "PASS")
        checks.append({"figure": figure, "setup": setup, "target": ", ".join(texts), "status": status})
    return checks


def render_table(summary, startup, checks, setups):
    by_key = {(c["figure"], c["setup"]): c for c in checks}
    rows = [("figure", "setup", "value", "x direct", "x pproxy", "target", "check")]
    peers = {s.name: s.peer for s in setups}
    for key, label, fmt in FIGURES:
        for name in peers:
            value = summary.get(name, {}).get(key)
            if value is None:
                continue
            direct = summary.get("direct", {}).get(key)
            peer = summary.get(peers[name], {}).get(key)
            check = by_key.get((key, name), {})
            rows.append((label, name, fmt.format(value),
                         f"{value / direct:.2f}" if direct else "",
                         f"{value / peer:.2f}" if peer else "",
                         check.get("target", ""), check.get("status", "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) if i in (2, 3, 4) else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_startup(startup, checks):
    """The start-up table: ms and multiples of `python3 -c pass` from the same run."""
    by_key = {c["figure"]: c for c in checks if c["setup"] == "startup"}
    base = startup.get("python_ms")
    rows = [("start-up (median)", "ms", "x python3 -c pass", "target", "check")]
    for key, label in [(k, l) for k, l, _ in STARTUP_COMMANDS] + [
            ("filter_added_ms", "added by --filter-network")]:
        if key in startup:
            check = by_key.get(key, {})
            rows.append((label, f"{startup[key]:.1f}", f"{startup[key] / base:.2f}" if base else "",
                         check.get("target", ""), check.get("status", "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) if i in (1, 2) else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_machine():
    def version(cmd, line=0):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[line]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None
    cpu = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "socat": " ".join((version(["socat", "-V"], 1) or "").split()[:3]),
            "bwrap": version(["bwrap", "--version"]), "curl": version(["curl", "--version"])}


# ---------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark socks_filter.py, its socat bridge and peer proxies side by side "
                    "on loopback. Prints one table; see the module docstring for how to read it.")
    parser.add_argument("--bytes", type=parse_size, default=None, metavar="SIZE",
                        help="bytes per bulk download, e.g. 1G, 256M (default 1G; 64M with --quick)")
    parser.add_argument("--passes", type=int, default=None, metavar="N",
                        help="passes over all setups, fresh processes each time (default 3; 2 with --quick)")
    parser.add_argument("--bulk-runs", type=int, default=None, metavar="N",
                        help="bulk downloads per setup and pass (default 2; 1 with --quick)")
    parser.add_argument("--rate-seconds", type=float, default=None, metavar="SECONDS",
                        help="seconds of the sequential connection test per pass (default 3; 1 with --quick)")
    parser.add_argument("--startup-runs", type=int, default=None, metavar="N",
                        help="runs per start-up command (default 15; 7 with --quick)")
    parser.add_argument("--setups", default=",".join(ALL_SETUPS), metavar="LIST",
                        help="comma-separated setups to run (default: all available): " + ", ".join(ALL_SETUPS))
    parser.add_argument("--socks-filter", metavar="PATH", default=Ours.script,
                        help="the socks_filter.py to measure (default: the one in this repository); "
                             "handy for comparing a modified copy")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up measurement")
    parser.add_argument("--startup-only", action="store_true",
                        help="only the start-up measurement (no proxy setups)")
    parser.add_argument("--quick", action="store_true", help="a short run with smaller defaults")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the working directory with the proxies' logs (its path is printed)")
    args = parser.parse_args(argv)
    defaults = {"bytes": (GIB, 64 * MIB), "passes": (3, 2), "bulk_runs": (2, 1),
                "rate_seconds": (3.0, 1.0), "startup_runs": (15, 7)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.setups = [] if args.startup_only else [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in args.setups if s not in ALL_SETUPS]
    if unknown:
        parser.error(f"unknown setup(s): {', '.join(unknown)}")
    if args.bytes <= 0 or args.passes <= 0 or args.bulk_runs <= 0 or args.rate_seconds <= 0 or args.startup_runs <= 0:
        parser.error("sizes, counts and durations must be positive")
    return args


def raise_fd_limit():
    """500 tunnels need about 1000 descriptors in the proxy: lift the soft limit for all children."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def interrupt(signum, frame):
    """Ctrl-C and SIGTERM end the run through the cleanup in main() (also when started in the
    background, where SIGINT would otherwise be ignored)."""
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    raise_fd_limit()
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    workdir = tempfile.mkdtemp(prefix="bw-bench-")
    try:
        return run(args, workdir)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything started", file=sys.stderr)
        return 130
    finally:
        PROCS.stop_all()
        if args.keep_logs:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args, workdir):
    Ours.script = os.path.abspath(args.socks_filter)
    setups, skipped = [], {}
    for setup in make_setups(args.setups, workdir):
        reason = setup.available()
        if reason:
            skipped[setup.name] = reason
            print(f"skip {setup.name}: {reason}", file=sys.stderr)
        else:
            setups.append(setup)
    env = fake_cli_env(workdir)
    upstreams = Upstreams(workdir)
    results = {s.name: {key: [] for key, _, _ in FIGURES} for s in setups}
    print(f"{len(setups)} setups, {args.passes} passes, {args.bulk_runs} x {args.bytes / MIB:g} MiB bulk per pass",
          file=sys.stderr)
    for n in range(args.passes):
        order = setups[n % len(setups):] + setups[:n % len(setups)] if setups else []
        for setup in order:
            if setup.name in skipped:
                continue
            started = time.perf_counter()
            try:
                measure_pass(setup, upstreams, args, results, env)
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                skipped[setup.name] = str(exc)
                results.pop(setup.name, None)
                print(f"pass {n + 1}: {setup.name} failed, dropped: {exc}", file=sys.stderr)
                continue
            print(f"pass {n + 1}: {setup.name} done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    startup = {"skipped": "--no-startup"} if args.no_startup else measure_startup(env, args.startup_runs)
    if "skipped" in startup:
        print(f"start-up: {startup['skipped']}", file=sys.stderr)
    summary = summarize(results)
    checks = check_targets(summary, startup)
    machine = describe_machine()
    print(f"machine: {machine['cpus']} x {machine['cpu']}, Linux {machine['kernel']}, Python {machine['python']}, "
          f"{machine['socat']}, {machine['bwrap']}")
    if summary:
        print(render_table(summary, startup, checks, [s for s in setups if s.name in summary]))
    if "skipped" not in startup:
        print(f"\nstart-up: {args.startup_runs} runs each, python3 = {startup['python3']}")
        print(render_startup(startup, checks))
    if args.json:
        report = {"machine": machine, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "options": {k: v for k, v in vars(args).items() if k != "json"},
                  "summary": summary, "runs": results, "startup": startup, "checks": checks,
                  "skipped": skipped}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
