"""What the proxy tests share: upstream servers, the proxy in process or as a command, raw
protocol clients, TLS hello builders, the log reader and ProxyTestCase.

Everything listens and connects on loopback only. Every socket has a timeout and every wait is
bounded (WAIT, unless a test needs a tighter bound); nothing asserts on elapsed time.
"""

import ipaddress
import json
import os
import queue
import resource
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import socks_filter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "socks_filter.py")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
LOOP = "127.0.0.1"
WAIT = 10.0          # the bound on every single wait, unless a test says otherwise
PROMPT = 5.0         # how long a well-behaved client waits for its answer: shorter than the
                     # proxy's handshake timeout, so a client served only once stalled
                     # connections time out counts as not served
START_WAIT = 15.0    # for the proxy command's ready line (it may start under unshare)


def skip_or_fail(test, reason):
    """Skip `test` for `reason`, except under CI=true where a missing prerequisite fails."""
    if IN_CI:
        test.fail(f"required under CI=true: {reason}")
    test.skipTest(reason)


def require_tool(test, tool, package=None):
    """Skip (fail under CI=true) when `tool` is not on PATH, naming the install command."""
    if shutil.which(tool) is None:
        skip_or_fail(test, f"needs {tool} (apt-get install {package or tool})")


def raise_nofile(test, wanted):
    """Raise this process's soft open-file limit to `wanted` for the test (skip, or fail under
    CI=true, when the hard limit is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        skip_or_fail(test, f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    test.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------------------------------------
# Upstream servers

class Upstream:
    """A TCP server on loopback: each connection runs handler(conn, record) on a thread of its own.

    records lists one dict per accepted connection, in accept order: "peer" (the address the
    proxy connected from), "data" (the bytes the handler kept) and "done". An upstream that a
    test denies counts every connection it accepts: one is an escape, whatever the proxy logged.
    """

    def __init__(self, handler, host=LOOP, port=0):
        self.handler = handler
        self.records = []
        self.sockets = set()
        self.threads = []
        self.finished = queue.Queue()
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(1024)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    @property
    def accepted(self):
        with self.cond:
            return len(self.records)

    def done_count(self):
        with self.cond:
            return sum(record["done"] for record in self.records)

    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                conn, peer = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(WAIT)
            record = {"peer": peer, "data": b"", "done": False}
            with self.cond:
                self.records.append(record)
                self.sockets.add(conn)
            thread = threading.Thread(target=self._handle, args=(conn, record), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _handle(self, conn, record):
        try:
            self.handler(conn, record)
        except OSError:
            pass
        finally:
            with self.cond:
                self.sockets.discard(conn)
                record["done"] = True
                self.cond.notify_all()
            conn.close()
            self.finished.put(record["data"])

    def wait_done(self, count=1):
        """Wait (bounded) until `count` connections have been handled; return the records."""
        with self.cond:
            self.cond.wait_for(lambda: sum(r["done"] for r in self.records) >= count, WAIT)
            return list(self.records)

    def next_record(self, timeout=WAIT + 2):
        """The bytes of the next connection to end (raises queue.Empty after `timeout`)."""
        return self.finished.get(timeout=timeout)

    def stop(self):
        """Stop accepting, end every open connection and check that every thread has ended."""
        self.stopping.set()
        self.listener.close()
        self.thread.join(WAIT)
        with self.cond:
            sockets = list(self.sockets)
        for conn in sockets:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(WAIT)
        assert not self.thread.is_alive() and not any(t.is_alive() for t in self.threads)


def echo_handler(conn, record):
    """Echo every byte back until the client ends; an HTTP request head (a capital letter, then
    " /" early on) gets a small HTTP answer instead."""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        record["data"] += data
        if record["data"][:1].isupper() and b" /" in record["data"][:20]:
            if b"\r\n\r\n" in record["data"]:
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                return
        else:
            conn.sendall(data)


def record_handler(reply=b"", idle=0.5):
    """Read until EOF, or until `idle` seconds pass without data once some arrived (10 s at the
    most), then send `reply` (if any) and close."""
    def handler(conn, record):
        conn.settimeout(idle)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                if record["data"]:
                    break
                continue
            if not chunk:
                break
            record["data"] += chunk
        if reply:
            conn.sendall(reply)
    return handler


def reply_after_eof(payload):
    """Read until the client half-closes, then send `payload` and close."""
    def handler(conn, record):
        record["data"] = read_to_eof(conn)
        conn.sendall(payload)
    return handler


def send_then_read(payload):
    """Send `payload`, half-close, then keep reading what the client still sends."""
    def handler(conn, record):
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        record["data"] = read_to_eof(conn)
    return handler


def http_handler(body):
    """A one-request HTTP server: records the request head and body, answers 200 with `body`."""
    def handler(conn, record):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
        record["data"] = head + b"\r\n\r\n" + rest
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(body), body))
    return handler


def hold_handler(conn, record):
    """Keep the connection open, reading and discarding, until the client or stop() ends it."""
    conn.settimeout(6 * WAIT)
    while conn.recv(65536):
        pass


class Flood:
    """A handler that sends `total` bytes, 1 MB at a time, and stops when a send stalls for 3 s
    (`stalled` is then set: the proxy held it back). `sent` counts over all connections."""

    def __init__(self, total):
        self.total = total
        self.sent = 0
        self.stalled = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, conn, record):
        conn.settimeout(3.0)
        chunk = b"\xab" * (1 << 20)
        while self.sent < self.total:
            try:
                conn.sendall(chunk)
            except socket.timeout:
                self.stalled.set()
                return
            with self.lock:
                self.sent += len(chunk)


def free_port():
    """A loopback port nothing listens on (bound, never listened on, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOP, 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Names that resolve to loopback without DNS: a private /etc/hosts for the proxy alone

HOSTS = """127.0.0.1 localhost
127.0.0.1 loop.example.com
::1 loop6.example.com
::ffff:127.0.0.1 mapped.example.com
64:ff9b::7f00:1 nat64.example.com
2002:7f00:1:: sixtofour.example.com
169.254.169.254 metadata.example.com
10.1.2.3 lan.example.com
0.0.0.0 zero.example.com
93.184.216.34 mixed.example.com
127.0.0.1 mixed.example.com
"""
MOUNT_HOSTS = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
MOUNT_BOTH = ('mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && '
              'exec "$@"')
NAMESERVER = "127.0.0.53"          # a fake DNS server inside a test's own network namespace
_namespace_support = {}


def namespace_prefix(directory, net=False):
    """Command prefix running a command with HOSTS as /etc/hosts in a mount namespace of its own
    (`unshare -rm`; with `net`, also in a new network namespace whose /etc/resolv.conf names
    NAMESERVER), or None when this host cannot create the namespaces. The files are written
    into `directory`."""
    hosts_path = os.path.join(directory, "hosts")
    with open(hosts_path, "w") as handle:
        handle.write(HOSTS)
    if net:
        resolv_path = os.path.join(directory, "resolv.conf")
        with open(resolv_path, "w") as handle:
            handle.write(f"nameserver {NAMESERVER}\noptions timeout:2 attempts:1\n")
        prefix = ["unshare", "-rnm", "sh", "-c", MOUNT_BOTH, "sh", hosts_path, resolv_path]
    else:
        prefix = ["unshare", "-rm", "sh", "-c", MOUNT_HOSTS, "sh", hosts_path]
    key = prefix[1]
    if key not in _namespace_support:
        ok = False
        if shutil.which("unshare") and shutil.which("mount"):
            try:
                probe = subprocess.run(prefix + ["grep", "-q", "loop.example.com", "/etc/hosts"],
                                       capture_output=True, timeout=20)
                ok = probe.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _namespace_support[key] = ok
    return prefix if _namespace_support[key] else None


# ---------------------------------------------------------------------------------------------
# The proxy, in this process or as the socks_filter.py command

def make_rule(text):
    """parse_rule(), except that "localhost[:PORT]" becomes a name rule.

    parse_rule() refuses single-label names as too broad, but localhost is the only name that
    resolves to loopback everywhere without DNS, so the tests that need a name which really
    resolves build that one rule directly (the server is under test here, not the rule parser).
    """
    host, _, port = text.partition(":")
    if host == "localhost":
        port, raw, _ = port.partition(socks_filter.RAW_SUFFIX)
        rule = socks_filter.Rule(text, "name", "localhost", int(port) if port else None)
        rule.raw = bool(raw)
        return rule
    return socks_filter.parse_rule(text)


def loopback_rules(port):
    """The IP rules that let an allowed name reach this machine's loopback on `port`
    (--allow-private does not: it opens only the private-use networks)."""
    return f"127.0.0.1:{port}", f"[::1]:{port}"


def make_policy(allow=(), deny=(), allow_private=False, mode="enforce"):
    return socks_filter.Policy([make_rule(r) for r in allow], [make_rule(r) for r in deny],
                               allow_private=allow_private, mode=mode)


def parse_address(text):
    """A ready-line address: a unix path stays a str, HOST:PORT becomes a tuple."""
    if "/" in text:
        return text
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class InProcessProxy:
    """A FilterServer serving on a daemon thread of this process (so that module globals such as
    HANDSHAKE_TIMEOUT can be changed for it); an exception out of serve_forever is kept in
    .error, since a crash is what some tests look for."""

    def __init__(self, allow=(), deny=(), allow_private=False, mode="enforce",
                 listen="127.0.0.1:0", log_path=None, **options):
        self.server = socks_filter.FilterServer(make_policy(allow, deny, allow_private, mode),
                                                [listen], log_path=log_path, **options)
        self.server.start()
        self.address = parse_address(self.server.addresses[0])
        self.port = None if isinstance(self.address, str) else self.address[1]
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.server.serve_forever()
        except BaseException as error:
            self.error = error

    def stop(self):
        self.server.shutdown()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "serve_forever did not stop"


# Runs socks_filter.main() with another HANDSHAKE_TIMEOUT (argv[1]) and, when argv[2] is not
# "0", a hard and soft RLIMIT_NOFILE of argv[2]; the rest is socks_filter's own argv.
WRAPPER = ("import resource, sys, socks_filter\n"
           "socks_filter.HANDSHAKE_TIMEOUT = float(sys.argv[1])\n"
           "if sys.argv[2] != '0':\n"
           "    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), int(sys.argv[2])))\n"
           "sys.exit(socks_filter.main(sys.argv[3:]))\n")


def read_line(fd, seconds=WAIT):
    """One line from a pipe, read byte by byte (what follows it stays in the pipe), bounded in
    time; b"" at EOF."""
    data, deadline = b"", time.monotonic() + seconds
    while not data.endswith(b"\n") and select.select(
            [fd], [], [], max(0, deadline - time.monotonic()))[0]:
        byte = os.read(fd, 1)
        if not byte:
            break
        data += byte
    return data


class ProxyProcess:
    """socks_filter.py run as a command with --ready-fd, on 127.0.0.1:0 unless `args` name a
    --listen. Its JSON log and stderr are kept in `directory`, which outlives the process, so
    both can be read after stop(). handshake_timeout and nofile run it through WRAPPER; `hosts`
    runs it with HOSTS as its /etc/hosts (unittest.SkipTest where that cannot be done)."""

    def __init__(self, directory, *args, handshake_timeout=None, nofile=0, hosts=False):
        self.log_path = os.path.join(directory, "log.jsonl")
        self.err_path = os.path.join(directory, "stderr")
        if "--listen" not in args:
            args = ("--listen", "127.0.0.1:0") + args
        if handshake_timeout is None and not nofile:
            command = [sys.executable, SCRIPT]
        else:
            timeout = socks_filter.HANDSHAKE_TIMEOUT if handshake_timeout is None else handshake_timeout
            command = [sys.executable, "-c", WRAPPER, str(timeout), str(nofile)]
        if hosts:
            prefix = namespace_prefix(directory)
            if prefix is None:
                raise unittest.SkipTest("needs `unshare -rm` and `mount` for a private /etc/hosts")
            command = prefix + command
        self._start(command + [*args, "--log", self.log_path])

    def _start(self, command):
        ready_read, ready_write = os.pipe()
        try:
            with open(self.err_path, "wb") as err:
                self.process = subprocess.Popen(
                    command + ["--ready-fd", str(ready_write)], pass_fds=(ready_write,), cwd=REPO,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        finally:
            os.close(ready_write)
        try:
            line = read_line(ready_read, START_WAIT).decode()
        finally:
            os.close(ready_read)
        if not line.startswith("ready "):
            self.stop()
            raise AssertionError(f"no ready line ({line!r}); stderr: {self.stderr()!r}")
        self.pid = self.process.pid
        self.addresses = line.split()[1:]
        self.address = parse_address(self.addresses[0])
        self.port = None if isinstance(self.address, str) else self.address[1]

    def alive(self):
        return self.process.poll() is None

    def stderr(self):
        with open(self.err_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def records(self, event="decision"):
        """The log's records of `event` (None: all) so far."""
        return [r for r in read_log(self.log_path) if event is None or r["event"] == event]

    def rss_kb(self):
        with open(f"/proc/{self.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def cpu_seconds(self):
        with open(f"/proc/{self.pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def fd_count(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, signum=signal.SIGTERM):
        """Send `signum` and wait (bounded) for the exit, killing it if it does not come; return
        the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(START_WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)
        return self.process.returncode


def read_log(path, count=0, predicate=None):
    """The JSON log's records, waiting (bounded) until `count` of them satisfy `predicate`.

    A line is complete only with its newline: one the proxy is still writing is left for the
    next read."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            text = ""
        complete = text[:text.rfind("\n") + 1]
        records = [json.loads(line) for line in complete.splitlines() if line.strip()]
        matching = [r for r in records if predicate is None or predicate(r)]
        if len(matching) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# Raw protocol clients

def dial(address, timeout=WAIT):
    """A connected socket: `address` is a unix path, (host, port), or a port on 127.0.0.1."""
    if isinstance(address, int):
        address = (LOOP, address)
    family = socket.AF_UNIX if isinstance(address, str) else (
        socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def recv_exact(sock, count, timeout=None):
    """Exactly `count` bytes, or fewer if the peer closed first (timeout: the socket's own)."""
    if timeout is not None:
        sock.settimeout(timeout)
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_until_closed(sock, timeout=PROMPT, limit=1 << 24):
    """(bytes received, True if the peer closed or reset) within `timeout` seconds overall."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(data) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(data), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return bytes(data), False
        except OSError:
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk
    return bytes(data), False


def read_to_eof(sock):
    """Everything until the peer closes; socket.timeout if it does not within WAIT."""
    data, closed = read_until_closed(sock, WAIT)
    if not closed:
        raise socket.timeout(f"no end after {len(data)} bytes")
    return data


def read_until(sock, wanted, timeout=PROMPT):
    """Bytes received until `wanted` is among them or the peer closes, bounded by `timeout`."""
    data, deadline = bytearray(), time.monotonic() + timeout
    while wanted not in data and time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def is_closed(sock):
    """True when the peer has closed: EOF (or a reset) within the socket's timeout."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def exchange(address, payload, timeout=PROMPT):
    """Send a whole request, read the answer until the proxy closes: (answer, closed)."""
    with dial(address, timeout) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            return b"", True
        return read_until_closed(sock, timeout)


GREETING = b"\x05\x01\x00"           # SOCKS5, one method: no authentication


def _socks5_name_target(name):
    return b"\x03" + bytes((len(name),)) + name


def socks5_request(host, port, command=1):
    """A SOCKS5 request without the greeting: an IP literal as ATYP 1 or 4, other text as a
    name (ATYP 3)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        target = _socks5_name_target(host.encode())
    else:
        target = (b"\x01" if address.version == 4 else b"\x04") + address.packed
    return bytes((5, command, 0)) + target + struct.pack("!H", port)


def socks5_name(name, port):
    """Greeting and CONNECT to `name` (bytes, sent as they are even when they spell an address)."""
    return GREETING + b"\x05\x01\x00" + _socks5_name_target(name) + struct.pack("!H", port)


def socks5_ip(address, port):
    """Greeting and CONNECT to an IP address (ATYP 1 or 4)."""
    return GREETING + socks5_request(address, port)


def socks5_open(address, host, port, early=b""):
    """Greeting and CONNECT in one segment; return (socket, 10-byte reply after the method reply)."""
    sock = dial(address)
    sock.sendall(GREETING + socks5_request(host, port) + early)
    method = recv_exact(sock, 2)
    if method != b"\x05\x00":
        sock.close()
        raise AssertionError(f"method reply {method!r}")
    return sock, recv_exact(sock, 10)


def socks4_ip(address, port):
    """A SOCKS4 CONNECT to an IPv4 address."""
    return (b"\x04\x01" + struct.pack("!H", port) + ipaddress.IPv4Address(address).packed
            + b"user\x00")


def socks4a_name(name, port):
    """A SOCKS4a CONNECT (DSTIP 0.0.0.1) to `name` (bytes)."""
    return b"\x04\x01" + struct.pack("!H", port) + b"\x00\x00\x00\x01" + b"user\x00" + name + b"\x00"


def http_connect(authority, extra=b""):
    return b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n" + extra + b"\r\n"


def http_get(authority, path=b"/", extra=b""):
    return (b"GET http://" + authority + path + b" HTTP/1.1\r\nHost: " + authority + b"\r\n"
            + extra + b"\r\n")


def authority(host, port):
    """host:port as bytes, an IPv6 address in brackets."""
    host = host if isinstance(host, bytes) else host.encode("latin-1")
    if b":" in host and not host.startswith(b"["):
        host = b"[" + host + b"]"
    return host + b":" + str(port).encode()


def read_http_response(sock):
    """Read until the proxy closes; return (status, {lowercase header: value}, body)."""
    data = read_to_eof(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/1.") else None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def granted(proto, answer):
    """The proxy's answer opens a tunnel, in the client's own protocol."""
    if proto == "socks5":
        return answer[2:4] == b"\x05\x00"
    if proto == "socks4a":
        return answer[:2] == b"\x00\x5a"
    return answer.startswith(b"HTTP/1.1 200") or answer.startswith(b"HTTP/1.0 200")


def refused(proto, answer):
    """A proper refusal in the client's own protocol."""
    if proto == "socks5":
        return answer[:2] == b"\x05\x00" and len(answer) >= 12 and answer[2] == 5 and answer[3] != 0
    if proto == "socks4a":
        return len(answer) == 8 and answer[:2] == b"\x00\x5b"
    return (answer.startswith(b"HTTP/1.1 4") or answer.startswith(b"HTTP/1.1 5")) and b"X-Proxy-Error" in answer


def attempts_for(host, port, protocols=("socks5", "socks4a", "http-connect", "http")):
    """(proto, payload) to reach `host` (bytes; name or IP spelling) through each protocol."""
    out = []
    bare = host[1:-1] if host.startswith(b"[") else host
    for proto in protocols:
        if proto == "socks5":
            out.append(("socks5", socks5_name(host, port)))
        elif proto == "socks4a":
            out.append(("socks4a", socks4a_name(host, port)))
        elif proto == "http-connect":
            out.append(("http", http_connect(authority(bare, port))))
        else:
            out.append(("http", http_get(authority(bare, port))))
    return out


def echo_through(address, payload, proto="socks5"):
    """A well-behaved client: open a tunnel with `payload`, check that bytes come back within
    PROMPT."""
    try:
        with dial(address, PROMPT) as sock:
            sock.sendall(payload)
            head = {"socks5": 12, "socks4a": 8}.get(proto)
            answer = recv_exact(sock, head) if head else read_until(sock, b"\r\n\r\n")
            if not granted(proto, answer):
                return False
            sock.sendall(b"ping-through-proxy")
            return recv_exact(sock, 18) == b"ping-through-proxy"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# TLS hellos

def client_hello(server_name=None):
    """A real ClientHello from the ssl module (server_name None: no SNI extension)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def tls_records(content_type, version, handshake, pieces):
    """`handshake` split over `pieces` TLS records."""
    size = -(-len(handshake) // pieces)
    return b"".join(content_type + version + struct.pack("!H", len(part)) + part
                    for part in (handshake[i:i + size] for i in range(0, len(handshake), size)))


def sni_extension(sni):
    entry = b"\x00" + struct.pack("!H", len(sni)) + sni
    names = struct.pack("!H", len(entry)) + entry
    return struct.pack("!HH", 0, len(names)) + names


def built_client_hello(sni=None, pieces=1):
    """A ClientHello assembled with struct: raw SNI bytes (anything), split over `pieces` records."""
    extensions = struct.pack("!HH", 43, 3) + b"\x02\x03\x04"               # supported_versions
    extensions += struct.pack("!HH", 21, 8) + bytes(8)                       # padding
    if sni is not None:
        extensions += sni_extension(sni)
    body = (b"\x03\x03" + bytes(32) + b"\x20" + bytes(32) + struct.pack("!H", 4) + b"\x13\x01\x13\x02"
            + b"\x01\x00" + struct.pack("!H", len(extensions)) + extensions)
    return tls_records(b"\x16", b"\x03\x01", b"\x01" + len(body).to_bytes(3, "big") + body, pieces)


# The random of a ServerHello that is a HelloRetryRequest (RFC 8446 section 4.1.3)
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
X25519, P256 = 0x1d, 0x17
CCS = b"\x14\x03\x03\x00\x01\x01"
# A valid P-256 key share (the curve's generator, uncompressed): a server checks the point.
P256_GENERATOR = bytes.fromhex("04" "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
                               "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5")


def key_share_hello(sni, groups=(X25519, P256), share=X25519, pieces=1):
    """A TLS 1.3 ClientHello offering `groups` but a key share only for `share` (None: none), so
    that a server limited to another offered group answers with a HelloRetryRequest. The
    shares are valid points (enough to reach the server's name callback, not to finish); the
    session id is fixed, as a second hello must repeat the first one's."""
    def extension(kind, body):
        return struct.pack("!HH", kind, len(body)) + body
    extensions = sni_extension(sni) if sni is not None else b""
    extensions += extension(43, b"\x02\x03\x04")
    listed = b"".join(struct.pack("!H", g) for g in groups)
    extensions += extension(10, struct.pack("!H", len(listed)) + listed)
    extensions += extension(13, b"\x00\x04\x04\x03\x08\x04")
    key = {X25519: os.urandom(32), P256: P256_GENERATOR}.get(share)
    shares = struct.pack("!HH", share, len(key)) + key if key else b""
    extensions += extension(51, struct.pack("!H", len(shares)) + shares)
    body = (b"\x03\x03" + os.urandom(32) + b"\x20" + b"s" * 32 + b"\x00\x02\x13\x01\x01\x00"
            + struct.pack("!H", len(extensions)) + extensions)
    return tls_records(b"\x16", b"\x03\x01", b"\x01" + len(body).to_bytes(3, "big") + body, pieces)


def server_hello(random, pieces=1):
    """A ServerHello record (HRR_RANDOM: a HelloRetryRequest), split over `pieces` records."""
    body = b"\x03\x03" + random + b"\x00\x13\x01\x00" + struct.pack("!H", 6) + b"\x00\x2b\x00\x02\x03\x04"
    return tls_records(b"\x16", b"\x03\x03", b"\x02" + len(body).to_bytes(3, "big") + body, pieces)


# ---------------------------------------------------------------------------------------------
# The test case

class ProxyTestCase(unittest.TestCase):
    """Starts upstreams and proxies that are all stopped at cleanup, in a temporary directory
    removed after them."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="bwpt-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.log = os.path.join(self.tmp, "proxy.jsonl")

    def upstream(self, handler, **options):
        server = Upstream(handler, **options)
        self.addCleanup(server.stop)
        return server

    def proxy(self, *allow, **options):
        """A FilterServer in this process allowing `allow`, logging to self.log."""
        options.setdefault("log_path", self.log)
        proxy = InProcessProxy(allow=allow, **options)
        self.addCleanup(proxy.stop)
        return proxy

    def daemon(self, *args, **options):
        """socks_filter.py as a command (see ProxyProcess), stopped at cleanup."""
        try:
            proxy = ProxyProcess(tempfile.mkdtemp(dir=self.tmp), *args, **options)
        except unittest.SkipTest as skip:
            skip_or_fail(self, str(skip))
        self.addCleanup(self._stop_daemon, proxy)
        return proxy

    def _stop_daemon(self, proxy):
        proxy.stop()
        self.assertIsNotNone(proxy.process.poll())

    def connection(self, sock):
        self.addCleanup(sock.close)
        return sock

    def assert_alive(self, proxy):
        self.assertTrue(proxy.alive(), f"proxy died: {proxy.stderr()[-3000:]}")
        self.assertNotIn("Traceback", proxy.stderr())
