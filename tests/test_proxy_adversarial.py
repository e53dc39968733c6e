"""Attacks on socks_filter.py over real sockets: each test is an escape or a denial of service that
would work against a naive filtering proxy, and asserts that it does not work against this one.

Everything runs on loopback (or in a network namespace a test creates with `unshare -rn`). Test
upstreams are small threaded servers that count every connection they accept: a "denied" upstream
that counts one connection is an escape, whatever the proxy logged.

    BypassOverTheWireTest      NOTES section 5 bypass classes through SOCKS5, SOCKS4a, CONNECT, GET
    HeaderInjectionTest        CR/LF/NUL in targets and Host, host:port@evil, Host vs URL
    SmugglingTest              pipelined and Content-Length/Transfer-Encoding smuggling
    Socks5NameLengthTest       SOCKS5 names of length 0, 253, 255 (and SOCKS4a over-long)
    SlowlorisTest              stalls and drips in every handshake state (in-process server)
    HalfOpenTest               2000 connections that send nothing
    BackPressureTest           clients that never read while upstreams send 200 MB
    ConnectionFloodTest        floods over --max-connections; refusals, no spinning
    DescriptorExhaustionTest   the proxy out of file descriptors (RLIMIT_NOFILE 64)
    OutputInjectionTest        terminal escapes and forged lines in names -> stderr and log
    SniCheckTest               TLS ClientHello server name check, SNI-stage stalls, and DNS
                               rebinding (port 443 and a fake DNS server in a private netns)
    FuzzTest                   3000 mutated SOCKS4/5 and HTTP handshakes, fixed seed
    HelloRetryTest             a second ClientHello for another site after a TLS 1.3
                               HelloRetryRequest, against a real `openssl s_server`

Names that must resolve to loopback (loop.example.com, ...) come from a private /etc/hosts that
`unshare -rm` bind-mounts for the proxy alone (HOSTS below): no DNS traffic leaves the machine.
Without user namespaces those tests skip, and fail under CI=true.
"""

import ipaddress
import json
import os
import queue
import random
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
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
T = 5.0                    # default socket timeout for test clients
LOOP = "127.0.0.1"

# Runs socks_filter.main() with a different HANDSHAKE_TIMEOUT (argv[1]) and, when argv[2] is not
# "0", a hard and soft RLIMIT_NOFILE of argv[2]; the rest is socks_filter's own argv.
WRAPPER = ("import resource, sys, socks_filter\n"
           "socks_filter.HANDSHAKE_TIMEOUT = float(sys.argv[1])\n"
           "if sys.argv[2] != '0':\n"
           "    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), int(sys.argv[2])))\n"
           "sys.exit(socks_filter.main(sys.argv[3:]))\n")


# Names the proxy resolves through a private /etc/hosts (bind-mounted in a mount namespace of its
# own, `unshare -rm`), so that allowed names can point at loopback without any DNS traffic.
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
NAMESERVER = "127.0.0.53"          # the fake DNS server inside the test's network namespace
_namespace_support = {}


def namespace_prefix(directory, net=False):
    """Command prefix running a command with HOSTS as /etc/hosts (and, when `net`, in a new
    network namespace whose /etc/resolv.conf names NAMESERVER), or None when this host cannot
    create the namespaces. The files are written into `directory`."""
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


def skip_or_fail(test, reason):
    if IN_CI:
        test.fail(f"required under CI=true: {reason}")
    test.skipTest(reason)


# ---------------------------------------------------------------------------------------------
# Test upstreams and the proxy under test

class Upstream:
    """A loopback TCP server that counts and records every connection it accepts.

    mode "record": read until EOF, or until `idle` seconds pass without data after some data
        arrived (10 s cap), then send `reply` (if any) and close; the bytes go to .records/.done.
    mode "echo": echo bytes back until EOF; an HTTP request head gets a small HTTP answer instead.
    mode "flood": send `flood` bytes (1 MB at a time) and stop when a send stalls for 3 s.
    mode "hold": keep the connection open, reading and discarding, until stop().
    """

    def __init__(self, mode="record", host=LOOP, port=0, reply=b"", idle=0.5, flood=0):
        self.mode, self.reply, self.idle, self.flood = mode, reply, idle, flood
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(512)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.accepted = 0
        self.records = []
        self.done = queue.Queue()
        self.sent = 0
        self.stalled = threading.Event()
        self.stopping = threading.Event()
        self.socks = set()
        self.threads = []
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.socks.add(conn)
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _handle(self, conn):
        data = bytearray()
        try:
            if self.mode == "flood":
                conn.settimeout(3.0)
                chunk = b"\xab" * (1 << 20)
                while self.sent < self.flood and not self.stopping.is_set():
                    try:
                        conn.sendall(chunk)
                    except socket.timeout:
                        self.stalled.set()
                        break
                    with self.lock:
                        self.sent += len(chunk)
            elif self.mode == "hold":
                conn.settimeout(0.2)
                while not self.stopping.is_set():
                    try:
                        if not conn.recv(65536):
                            break
                    except socket.timeout:
                        continue
            else:
                conn.settimeout(self.idle if self.mode == "record" else 0.2)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not self.stopping.is_set():
                    try:
                        chunk = conn.recv(65536)
                    except socket.timeout:
                        if self.mode == "record" and data:
                            break
                        continue
                    if not chunk:
                        break
                    data += chunk
                    if self.mode == "echo":
                        if data[:1].isupper() and b" /" in data[:20]:
                            if b"\r\n\r\n" in data:
                                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                                break
                        else:
                            conn.sendall(chunk)
                if self.reply:
                    conn.sendall(self.reply)
        except OSError:
            pass
        finally:
            with self.lock:
                self.records.append(bytes(data))
                self.socks.discard(conn)
            self.done.put(bytes(data))
            conn.close()

    def next_record(self, timeout=12):
        return self.done.get(timeout=timeout)

    def stop(self):
        self.stopping.set()
        self.listener.close()
        self.thread.join(5)
        with self.lock:
            socks = list(self.socks)
        for conn in socks:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(5)
        assert not self.thread.is_alive() and not any(t.is_alive() for t in self.threads)


class ProxyProcess:
    """socks_filter.py as a subprocess on 127.0.0.1:0 with a JSON log; stop() leaves nothing."""

    def __init__(self, args, handshake_timeout=None, listen="127.0.0.1:0", hosts=False, nofile=0):
        self.dir = tempfile.mkdtemp(prefix="bw-adv-")
        self.log_path = os.path.join(self.dir, "log.jsonl")
        self.err_path = os.path.join(self.dir, "stderr")
        self.final_stderr = None
        timeout = socks_filter.HANDSHAKE_TIMEOUT if handshake_timeout is None else handshake_timeout
        command = [sys.executable, "-c", WRAPPER, str(timeout), str(nofile), "--listen", listen,
                   "--log", self.log_path] + list(args)
        if hosts:
            prefix = namespace_prefix(self.dir)
            if prefix is None:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise unittest.SkipTest("needs `unshare -rm` and `mount` for a private /etc/hosts")
            command = prefix + command
        self.err = open(self.err_path, "wb")
        self.process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=self.err)
        ready, _, _ = select.select([self.process.stdout], [], [], 15)
        line = self.process.stdout.readline().decode() if ready else ""
        if not line.startswith("ready "):
            error = self.stderr()
            self.stop()
            raise AssertionError(f"proxy did not start: {line!r} {error!r}")
        self.port = int(line.split()[1].rpartition(":")[2])
        self.pid = self.process.pid

    def alive(self):
        return self.process.poll() is None

    def stderr(self):
        if self.final_stderr is not None:
            return self.final_stderr
        with open(self.err_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def records(self, event="decision"):
        """The log's records so far; a last line the proxy is still writing is left for later."""
        try:
            with open(self.log_path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            return []
        complete = text[:text.rfind("\n") + 1]
        return [r for r in (json.loads(line) for line in complete.splitlines() if line.strip())
                if event is None or r["event"] == event]

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

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process.stdout.close()
        self.err.close()
        if self.final_stderr is None:
            self.final_stderr = self.stderr()
        shutil.rmtree(self.dir, ignore_errors=True)


class InProcessProxy:
    """FilterServer in a thread of the test process (so module globals can be monkeypatched)."""

    def __init__(self, allow, allow_private=False):
        self.dir = tempfile.mkdtemp(prefix="bw-adv-")
        self.log_path = os.path.join(self.dir, "log.jsonl")
        policy = socks_filter.Policy([socks_filter.parse_rule(r) for r in allow],
                                     allow_private=allow_private)
        self.server = socks_filter.FilterServer(policy, ["127.0.0.1:0"], log_path=self.log_path)
        self.port = int(self.server.start()[0].rpartition(":")[2])
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.server.serve_forever()
        except BaseException as error:     # recorded: a crash is what the tests look for
            self.error = error

    def stop(self):
        self.server.shutdown()
        self.thread.join(10)
        assert not self.thread.is_alive(), "serve_forever did not stop"
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Clients

def connect(port, timeout=T):
    return socket.create_connection((LOOP, port), timeout=timeout)


def read_until_closed(sock, timeout=T, limit=1 << 20):
    """(bytes received, True if the peer closed) within `timeout` seconds overall."""
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


def recv_exactly(sock, count, timeout=T):
    data = bytearray()
    sock.settimeout(timeout)
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def exchange(port, payload, timeout=T):
    """Send a whole request, read the answer until the proxy closes: (answer, closed)."""
    with connect(port, timeout) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            return b"", True
        return read_until_closed(sock, timeout)


def socks5_name(name, port):
    return (b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name
            + struct.pack("!H", port))


def socks5_ip(address, port):
    address = ipaddress.ip_address(address)
    kind = b"\x01" if address.version == 4 else b"\x04"
    return b"\x05\x01\x00" + b"\x05\x01\x00" + kind + address.packed + struct.pack("!H", port)


def socks4_ip(address, port):
    return (b"\x04\x01" + struct.pack("!H", port) + ipaddress.IPv4Address(address).packed
            + b"user\x00")


def socks4a_name(name, port):
    return b"\x04\x01" + struct.pack("!H", port) + b"\x00\x00\x00\x01" + b"user\x00" + name + b"\x00"


def http_connect(authority, extra=b""):
    return b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n" + extra + b"\r\n"


def http_get(authority, path=b"/", extra=b""):
    return (b"GET http://" + authority + path + b" HTTP/1.1\r\nHost: " + authority + b"\r\n"
            + extra + b"\r\n")


def authority(host, port):
    host = host if isinstance(host, bytes) else host.encode("latin-1")
    if b":" in host and not host.startswith(b"["):
        host = b"[" + host + b"]"
    return host + b":" + str(port).encode()


def granted(proto, answer):
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


def echo_through(port, payload, proto="socks5"):
    """A well-behaved client: open a tunnel with `payload`, check that bytes come back."""
    try:
        return _echo_through(port, payload, proto)
    except OSError:
        return False


def _echo_through(port, payload, proto):
    with connect(port) as sock:
        sock.sendall(payload)
        head = {"socks5": 12, "socks4a": 8}.get(proto)
        if head:
            answer = recv_exactly(sock, head)
        else:
            answer = b""
            while b"\r\n\r\n" not in answer and len(answer) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        if not granted(proto, answer):
            return False
        sock.sendall(b"ping-through-proxy")
        return recv_exactly(sock, 18) == b"ping-through-proxy"


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


def built_client_hello(sni=None, pieces=1):
    """A ClientHello assembled with struct: raw SNI bytes (anything), split over `pieces` records."""
    extensions = struct.pack("!HH", 43, 3) + b"\x02\x03\x04"               # supported_versions
    extensions += struct.pack("!HH", 21, 8) + bytes(8)                       # padding
    if sni is not None:
        entry = b"\x00" + struct.pack("!H", len(sni)) + sni
        names = struct.pack("!H", len(entry)) + entry
        extensions += struct.pack("!HH", 0, len(names)) + names
    body = (b"\x03\x03" + bytes(32) + b"\x20" + bytes(32) + struct.pack("!H", 4) + b"\x13\x01\x13\x02"
            + b"\x01\x00" + struct.pack("!H", len(extensions)) + extensions)
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    size = -(-len(handshake) // pieces)
    return b"".join(b"\x16\x03\x01" + struct.pack("!H", len(part)) + part
                    for part in (handshake[i:i + size] for i in range(0, len(handshake), size)))


def raise_nofile(test, wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        skip_or_fail(test, f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    test.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


class ProxyTestCase(unittest.TestCase):
    def upstream(self, *args, **kwargs):
        server = Upstream(*args, **kwargs)
        self.addCleanup(server.stop)
        return server

    def proxy(self, *args, **kwargs):
        try:
            proxy = ProxyProcess(*args, **kwargs)
        except unittest.SkipTest as skip:
            skip_or_fail(self, str(skip))
        self.addCleanup(self._stop_proxy, proxy)
        return proxy

    def _stop_proxy(self, proxy):
        proxy.stop()
        self.assertIsNotNone(proxy.process.poll())

    def assert_alive(self, proxy):
        self.assertTrue(proxy.alive(), f"proxy died: {proxy.stderr()[-3000:]}")
        self.assertNotIn("Traceback", proxy.stderr())


# ---------------------------------------------------------------------------------------------

class BypassOverTheWireTest(ProxyTestCase):
    """NOTES section 5 through every protocol: the loopback upstream must never be reached."""

    def test_bypass_classes_never_reach_loopback(self):
        target = self.upstream("record")
        port = target.port
        proxy = self.proxy(["--allow", "example.com", "--allow", "*.example.com"], hosts=True)
        names = {
            b"x.example.com.evil.net": {"not-in-allowlist"},
            b"evilexample.com": {"not-in-allowlist"},
            b"example.com.evil.net": {"not-in-allowlist"},
            b"xexample.com": {"not-in-allowlist"},
            b"example.com\n": {"bad-name", "bad-request"},
            b"example.com\r\n": {"bad-name", "bad-request"},
            b"localhost\x00.example.com": {"bad-name", "bad-request"},
            b"localhost\x00": {"bad-name", "bad-request"},
            b"local host": {"bad-name", "bad-request"},
            b"localhost%00.example.com": {"bad-name", "bad-request"},
            b"*.example.com": {"bad-name", "bad-request"},
            b"example.com..": {"bad-name", "bad-request"},
            b"127.1": {"private-address"},
            b"0x7f.1": {"private-address"},
            b"2130706433": {"private-address"},
            b"0x7f000001": {"private-address"},
            b"0177.0.0.1": {"private-address"},
            b"017700000001": {"private-address"},
            b"127.0.0.1.": {"private-address"},
            b"0.0.0.0": {"private-address"},
            b"0": {"private-address"},
            b"[::ffff:127.0.0.1]": {"private-address"},
            b"[::ffff:7f00:1]": {"private-address"},
            b"[64:ff9b::7f00:1]": {"private-address"},
            b"[2002:7f00:1::]": {"private-address"},
            b"[::1]": {"private-address"},
            b"[::]": {"private-address"},
            b"[::127.0.0.1]": {"private-address"},
            b"localhost": {"not-in-allowlist"},
            # allowed names (by *.example.com) whose addresses are loopback, private or wrapped
            b"loop.example.com": {"private-address"},
            b"LOOP.Example.COM.": {"private-address"},
            b"loop6.example.com": {"private-address"},
            b"mapped.example.com": {"private-address"},
            b"nat64.example.com": {"private-address"},
            b"sixtofour.example.com": {"private-address"},
            b"metadata.example.com": {"platform-endpoint"},
            b"lan.example.com": {"private-address"},
            b"zero.example.com": {"private-address"},
            b"mixed.example.com": {"private-address"},     # one public, one loopback address
        }
        plan = []
        for host, reasons in names.items():
            for proto, payload in attempts_for(host, port):
                if proto == "socks4a" and b"\x00" in host:
                    # SOCKS4a ends the name at the NUL: the proxy sees (and decides on) "localhost"
                    reasons = reasons | {"not-in-allowlist"}
                plan.append((host, proto, payload, reasons))
            if host.startswith(b"["):
                plan.append((host, "socks5", socks5_name(host[1:-1], port), reasons))
        for address in ("127.0.0.1", "0.0.0.0", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1",
                        "2002:7f00:1::"):
            plan.append((address.encode(), "socks5", socks5_ip(address, port), {"private-address"}))
        for address in ("127.0.0.1", "0.0.0.0", "127.255.255.254"):
            plan.append((address.encode(), "socks4a", socks4_ip(address, port), {"private-address"}))

        for host, proto, payload, reasons in plan:
            with self.subTest(host=host, proto=proto, payload=payload[:60]):
                answer, closed = exchange(proxy.port, payload)
                self.assertTrue(closed, "proxy left a denied request hanging")
                self.assertTrue(refused(proto, answer), f"not a proper refusal: {answer[:200]!r}")
        decisions = proxy.records()
        self.assertEqual(len(decisions), len(plan))
        for (host, proto, payload, reasons), record in zip(plan, decisions):
            with self.subTest(host=host, proto=proto, record=record):
                self.assertEqual(record["decision"], "deny")
                self.assertIn(record["reason"], reasons)
        self.assertEqual([r for r in proxy.records("close") if r["reason"] == "lookup-failed"], [],
                         "a denied name was looked up")
        self.assert_alive(proxy)
        self.assertEqual(target.accepted, 0, "the loopback upstream was reached")

    def test_audit_mode_still_refuses_private_and_bad_names(self):
        """--mode audit lets unlisted destinations through; never loopback, private or bad names."""
        target = self.upstream("record")
        port = target.port
        proxy = self.proxy(["--allow", "example.com", "--mode", "audit"], hosts=True)
        hosts = [b"localhost", b"loop.example.com", b"LOOP.Example.COM.", b"mapped.example.com",
                 b"nat64.example.com", b"metadata.example.com", b"lan.example.com", b"zero.example.com",
                 b"mixed.example.com", b"127.1", b"0x7f.1", b"2130706433", b"0177.0.0.1", b"0.0.0.0",
                 b"[::ffff:127.0.0.1]", b"[::1]", b"localhost\x00.example.com", b"example.com\n"]
        count = 0
        for host in hosts:
            for proto, payload in attempts_for(host, port):
                with self.subTest(host=host, proto=proto):
                    answer, closed = exchange(proxy.port, payload)
                    self.assertTrue(closed)
                    self.assertTrue(refused(proto, answer), answer[:200])
                    count += 1
        denials = [r for r in proxy.records() if r["decision"] == "deny" and r.get("enforced", True)]
        self.assertEqual(len(denials), count)
        self.assertEqual(target.accepted, 0, "audit mode let a request reach loopback")
        self.assert_alive(proxy)

    def test_canonical_spellings_of_allowed_destinations_pass(self):
        """The positive control: the same wire paths DO reach the upstream when a rule allows it,
        so the denials above are the policy and not a broken test harness."""
        target = self.upstream("echo")
        port = target.port
        # /raw: the echo stream is not TLS (a plain name rule would close it, see SniCheckTest)
        proxy = self.proxy(["--allow", f"loop.example.com:{port}/raw", "--allow", f"127.0.0.1:{port}",
                            "--allow", f"mapped.example.com:{port}/raw", "--allow-private"], hosts=True)
        plan = []
        for host in (b"loop.example.com", b"LOOP.Example.COM.", b"127.1", b"0x7f.1", b"2130706433",
                     b"0177.0.0.1", b"[::ffff:127.0.0.1]"):
            for proto, payload in attempts_for(host, port, ("socks5", "socks4a", "http-connect")):
                plan.append((host, proto, payload))
        plan.append((b"127.0.0.1", "socks5", socks5_ip("127.0.0.1", port)))
        plan.append((b"127.0.0.1", "socks4a", socks4_ip("127.0.0.1", port)))
        for host, proto, payload in plan:
            with self.subTest(host=host, proto=proto):
                self.assertTrue(echo_through(proxy.port, payload, proto))
        for host in (b"Loop.Example.Com.", b"127.1"):
            answer, closed = exchange(proxy.port, http_get(authority(host, port)))
            self.assertTrue(answer.startswith(b"HTTP/1.0 200"), answer[:200])
        self.assertEqual(target.accepted, len(plan) + 2)
        # --allow-private and an IP rule for 127.0.0.1 still do not open 0.0.0.0 or other ports
        before = target.accepted
        for payload, proto in ((socks5_name(b"0.0.0.0", port), "socks5"),
                               (socks5_name(b"0", port), "socks5"),
                               (socks5_name(b"zero.example.com", port), "socks5"),
                               (socks5_name(b"loop.example.com", port + 1 if port < 65535 else 1), "socks5"),
                               (http_connect(authority(b"127.0.0.2", port)), "http")):
            answer, _ = exchange(proxy.port, payload)
            self.assertTrue(refused(proto, answer), answer[:200])
        self.assertEqual(target.accepted, before)


class HeaderInjectionTest(ProxyTestCase):
    """CR/LF/NUL in CONNECT targets and Host headers, junk after the port, Host vs URL."""

    def test_injected_heads_are_refused_before_any_connection(self):
        allowed = self.upstream("record", reply=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        denied = self.upstream("record")
        a = f"127.0.0.1:{allowed.port}".encode()
        d = f"127.0.0.1:{denied.port}".encode()
        proxy = self.proxy(["--allow", a.decode()])
        heads = [
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: " + a + b"\rX-Injected: 1\r\n\r\n",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: " + a + b"\nHost: " + d + b"\r\n\r\n",
            b"CONNECT " + a + b"\nHost: " + d + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b"\r\nCONNECT " + d + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b"\x00 HTTP/1.1\r\n\r\n",
            b"CONNECT 127.0.0.1\x00.example.com:" + str(allowed.port).encode() + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: " + a + b"\x00.evil\r\n\r\n",
            b"CONNECT " + a + b"@" + d + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + d + b"@" + a + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b"#@" + d + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b"/@" + d + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b":" + str(denied.port).encode() + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b" " + d + b" HTTP/1.1\r\n\r\n",
            b"CONNECT http://" + a + b" HTTP/1.1\r\n\r\n",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: 127.0.0.2:" + str(allowed.port).encode() + b"\r\n\r\n",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: " + a + b"\r\nHost: " + d + b"\r\n\r\n",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: " + a + b"\r\n " + d + b"\r\n\r\n",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost : " + d + b"\r\n\r\n",
            # absolute-form
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: " + d + b"\r\n\r\n",
            b"GET http://" + d + b"/ HTTP/1.1\r\nHost: " + a + b"\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: evil.example.net\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\nHost: " + d + b"\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\nHost: " + d + b"\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\nX-A: 1\x00\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\nX-A: 1\rGET / HTTP/1.1\r\n\r\n",
            b"GET http://" + a + b"/\r\nHost: " + d + b" HTTP/1.1\r\n\r\n",
            b"GET http://" + a + b"/\tx HTTP/1.1\r\nHost: " + a + b"\r\n\r\n",
            b"GET http://" + a + b"@" + d + b"/ HTTP/1.1\r\nHost: " + d + b"\r\n\r\n",
            b"GET http://" + d + b"@" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\n\r\n",
            b"GET http://" + a + b"#@" + d + b"/ HTTP/1.1\r\n\r\n",
            b"GET http://" + a + b"\\@" + d + b"/ HTTP/1.1\r\n\r\n",
            b"GET http://" + a + b"\x00/ HTTP/1.1\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n",
            b"GET /relative HTTP/1.1\r\nHost: " + a + b"\r\n\r\n",
            b"GET https://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\n\r\n",
            b"GET http://" + a + b"/ HTTP/2.0\r\nHost: " + a + b"\r\n\r\n",
            b"GET  http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\n\r\n",
        ]
        for head in heads:
            with self.subTest(head=head[:120]):
                answer, closed = exchange(proxy.port, head)
                self.assertTrue(closed)
                self.assertRegex(answer[:12], rb"^HTTP/1\.1 4\d\d", answer[:300])
                self.assertIn(b"X-Proxy-Error", answer)
        self.assertEqual(allowed.accepted, 0, "a malformed head reached the allowed upstream")
        self.assertEqual(denied.accepted, 0, "a malformed head reached a denied upstream")
        # positive control: the clean request goes through, with Host rewritten from the URL
        answer, _ = exchange(proxy.port, http_get(a, b"/clean", b"Connection: keep-alive\r\n"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:200])
        received = allowed.next_record()
        self.assertTrue(received.startswith(b"GET /clean HTTP/1.1\r\nHost: " + a + b"\r\n"), received)
        self.assertIn(b"Connection: close\r\n", received)
        self.assertNotIn(b"keep-alive", received)
        self.assertEqual(denied.accepted, 0)
        self.assert_alive(proxy)


class SmugglingTest(ProxyTestCase):
    """A second request hidden behind the first must not reach any upstream."""

    REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"

    def setUp(self):
        self.allowed = self.upstream("record", reply=self.REPLY, idle=0.6)
        self.denied = self.upstream("record", reply=self.REPLY)
        self.a = f"127.0.0.1:{self.allowed.port}".encode()
        self.d = f"127.0.0.1:{self.denied.port}".encode()
        self.proxy_ = self.proxy(["--allow", self.a.decode()])

    def forwarded(self, payload, later=b""):
        """Send payload (and `later` after a pause), return (answer, what the upstream got)."""
        with connect(self.proxy_.port) as sock:
            sock.sendall(payload)
            if later:
                time.sleep(0.2)
                try:
                    sock.sendall(later)
                except OSError:
                    pass
            answer, closed = read_until_closed(sock, 12)
        self.assertTrue(closed)
        return answer, self.allowed.next_record()

    def assert_single_request(self, received, *forbidden):
        self.assertEqual(received.count(b" HTTP/1.1\r\n"), 1, received)
        for text in forbidden:
            self.assertNotIn(text, received)

    def test_pipelined_requests(self):
        first = http_get(self.a, b"/one")
        cases = [
            (first + http_get(self.d, b"/two"), b""),
            (first + b"GET /two HTTP/1.1\r\nHost: evil.example.net\r\n\r\n", b""),
            (first + http_get(self.a, b"/two", b"Host: x\r\n"), b""),
            (first, b"GET /two HTTP/1.1\r\nHost: evil.example.net\r\n\r\n"),
            (first, http_get(self.d, b"/two")),
        ]
        for payload, later in cases:
            with self.subTest(payload=payload, later=later):
                answer, received = self.forwarded(payload, later)
                self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
                self.assert_single_request(received, b"/two", b"evil", b"http://" + self.d,
                                           b"Host: " + self.d + b"\r\n")
        self.assertEqual(self.allowed.accepted, len(cases))
        self.assertEqual(self.denied.accepted, 0)

    def test_request_after_response_on_kept_alive_connection(self):
        with connect(self.proxy_.port) as sock:
            sock.sendall(http_get(self.a, b"/one", b"Connection: keep-alive\r\n"))
            answer = b""
            while not answer.endswith(b"ok"):
                chunk = sock.recv(4096)
                self.assertTrue(chunk, answer)
                answer += chunk
            try:
                sock.sendall(http_get(self.d, b"/two") + b"GET /three HTTP/1.1\r\nHost: evil\r\n\r\n")
            except OSError:
                pass
            rest, closed = read_until_closed(sock, 12)
        self.assertTrue(closed)
        self.assertEqual(rest, b"")
        self.assert_single_request(self.allowed.next_record(), b"/two", b"/three")
        self.assertEqual(self.allowed.accepted, 1)
        self.assertEqual(self.denied.accepted, 0)

    def test_content_length_bounds_the_body(self):
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: evil.example.net\r\n\r\n"
        head = (b"POST http://" + self.a + b"/one HTTP/1.1\r\nHost: " + self.a
                + b"\r\nContent-Length: 5\r\n\r\n")
        answer, received = self.forwarded(head + b"hello" + smuggled)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        self.assertTrue(received.endswith(b"\r\n\r\nhello"), received)
        self.assert_single_request(received, b"smuggled", b"evil")
        head0 = (b"POST http://" + self.a + b"/one HTTP/1.1\r\nHost: " + self.a
                 + b"\r\nContent-Length: 0\r\n\r\n")
        answer, received = self.forwarded(head0, smuggled)
        self.assert_single_request(received, b"smuggled", b"evil")
        self.assertTrue(received.endswith(b"\r\n\r\n"), received)

    def test_conflicting_framing_is_refused(self):
        base = b"POST http://" + self.a + b"/one HTTP/1.1\r\nHost: " + self.a + b"\r\n"
        body = b"0\r\n\r\nGET http://" + self.d + b"/x HTTP/1.1\r\nHost: " + self.d + b"\r\n\r\n"
        heads = [
            base + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            base + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            base + b"Transfer-Encoding: chunked\r\n\r\n",
            base + b"Transfer-Encoding:\tchunked\r\n\r\n",
            base + b"Transfer-Encoding: identity, chunked\r\n\r\n",
            base + b"transfer-encoding: CHUNKED\r\n\r\n",
            base + b"Transfer-Encoding : chunked\r\n\r\n",
            base + b"Transfer-Encoding\x0b: chunked\r\n\r\n",
            base + b"Content-Length: 5\r\nContent-Length: 50\r\n\r\n",
            base + b"Content-Length: 5, 50\r\n\r\n",
            base + b"Content-Length: +5\r\n\r\n",
            base + b"Content-Length: -1\r\n\r\n",
            base + b"Content-Length: 0x5\r\n\r\n",
            base + b"Content-Length: 5 5\r\n\r\n",
        ]
        for head in heads:
            with self.subTest(head=head):
                answer, closed = exchange(self.proxy_.port, head + body)
                self.assertTrue(closed)
                self.assertRegex(answer[:12], rb"^HTTP/1\.1 4(00|11)", answer[:300])
        self.assertEqual(self.allowed.accepted, 0)
        self.assertEqual(self.denied.accepted, 0)
        self.assert_alive(self.proxy_)


class Socks5NameLengthTest(ProxyTestCase):
    def test_name_lengths(self):
        target = self.upstream("record")
        proxy = self.proxy(["--allow", "*.example.com"])
        long253 = (".".join(["a" * 63] * 3 + ["b" * 49]) + ".example.com").encode()
        self.assertEqual(len(long253), 253)
        long255 = (".".join(["a" * 63] * 3 + ["b" * 51]) + ".example.com").encode()
        self.assertEqual(len(long255), 255)
        dotted254 = long253 + b"."
        cases = [
            (socks5_name(b"", target.port), "bad-name", ""),
            (socks5_name(long255, target.port), "bad-name", None),
            (socks5_name(b"\xff" * 255, target.port), "bad-name", None),
            (socks5_name(b"." * 255, target.port), "bad-name", None),
            # 253 bytes is a legal name; it is parsed whole (not truncated) and checked as such
            (socks5_name(long253.replace(b"example", b"exbmple"), target.port), "not-in-allowlist",
             long253.replace(b"example", b"exbmple").decode()),
            (socks5_name(dotted254.replace(b"example", b"exbmple"), target.port), "not-in-allowlist",
             long253.replace(b"example", b"exbmple").decode()),
            (socks4a_name(b"a" * 300, target.port), "bad-request", ""),
        ]
        for payload, reason, host in cases:
            with self.subTest(payload=payload[:40], reason=reason):
                answer, closed = exchange(proxy.port, payload)
                self.assertTrue(closed)
                proto = "socks5" if payload[0] == 5 else "socks4a"
                self.assertTrue(refused(proto, answer), answer)
                record = proxy.records()[-1]
                self.assertEqual((record["decision"], record["reason"]), ("deny", reason))
                if host is not None:
                    self.assertEqual(record["host"], host)
        # length 0 followed by bytes that look like a second request: nothing is reached
        answer, closed = exchange(proxy.port, socks5_name(b"", target.port)
                                  + b"\x05\x01\x00\x03\x09localhost" + struct.pack("!H", target.port))
        self.assertTrue(closed)
        self.assertTrue(refused("socks5", answer[:12]), answer)
        # a declared length longer than what is sent, then EOF: closed, nothing reached
        with connect(proxy.port) as sock:
            sock.sendall(b"\x05\x01\x00\x05\x01\x00\x03\xffabc")
            sock.shutdown(socket.SHUT_WR)
            answer, closed = read_until_closed(sock)
        self.assertTrue(closed)
        self.assertEqual(answer, b"\x05\x00")
        self.assertEqual(target.accepted, 0)
        self.assert_alive(proxy)


# ---------------------------------------------------------------------------------------------
# Denial of service

class SlowlorisTest(unittest.TestCase):
    """Stalls and drips in every handshake state; HANDSHAKE_TIMEOUT monkeypatched to 1 s."""

    def test_stalled_handshakes_are_dropped_and_others_served(self):
        for name in ("HANDSHAKE_TIMEOUT", "CLOSING_TIMEOUT"):
            self.addCleanup(setattr, socks_filter, name, getattr(socks_filter, name))
            setattr(socks_filter, name, 1.0)
        target = Upstream("echo")
        self.addCleanup(target.stop)
        proxy = InProcessProxy([f"127.0.0.1:{target.port}"])
        self.addCleanup(proxy.stop)
        p = struct.pack("!H", target.port)
        good = socks5_ip("127.0.0.1", target.port)
        stalls = {
            "connected, silent": b"",
            "socks5 greeting, 1 byte": b"\x05",
            "socks5 greeting, methods missing": b"\x05\x02\x00",
            "socks5 request, partial name": b"\x05\x01\x00" + b"\x05\x01\x00\x03\x20abc",
            "socks5 request, partial ipv4": b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00",
            "socks5 request, no port": b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01",
            "socks4, partial header": b"\x04\x01" + p,
            "socks4, user id not ended": b"\x04\x01" + p + b"\x7f\x00\x00\x01user",
            "socks4a, name not ended": b"\x04\x01" + p + b"\x00\x00\x00\x01\x00localh",
            "http, one letter": b"C",
            "http, head not ended": b"CONNECT 127.0.0.1:" + str(target.port).encode() + b" HTTP/1.1\r\nHost: 1",
            "http, absolute-form not ended": b"GET http://127.0.0.1/ HTTP/1.1\r\n",
        }
        drips = {
            "drip socks5 request": b"\x05\x01\x00\x05\x01\x00\x03\xff" + b"a" * 255,
            "drip socks4a name": b"\x04\x01" + p + b"\x00\x00\x00\x01\x00" + b"a" * 250,
            "drip http head": b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 400,
            # refused at once (denied destination / malformed), then keeps talking slowly
            "drip after a refusal": b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n" + b"a" * 400,
            "drip after a malformed request": b"\x05\x01\x00\x05\x09" + b"a" * 400,
        }
        sockets = {}
        for name, payload in stalls.items():
            sock = connect(proxy.port)
            self.addCleanup(sock.close)
            if payload:
                sock.sendall(payload)
            sockets[name] = sock
        dropped = {}

        def drip(name, payload):
            """One byte every 0.15 s; dropped = the proxy closed the connection for good (a
            send fails), not merely half-closed it after a refusal."""
            dropped[name] = False
            eof = False
            with connect(proxy.port) as sock:
                for i in range(len(payload)):     # at most ~60 s, far beyond the 1 s timeouts
                    try:
                        sock.sendall(payload[i:i + 1])
                    except socket.timeout:
                        return
                    except OSError:
                        dropped[name] = True
                        return
                    if eof:
                        time.sleep(0.15)
                        continue
                    readable, _, _ = select.select([sock], [], [], 0.15)
                    if readable:
                        try:
                            eof = not sock.recv(4096)
                        except OSError:
                            dropped[name] = True
                            return
        threads = [threading.Thread(target=drip, args=item, daemon=True) for item in drips.items()]
        for thread in threads:
            thread.start()
        # while every state is stalled, a well-behaved client is served
        self.assertTrue(echo_through(proxy.port, good))
        self.assertTrue(echo_through(proxy.port, http_connect(f"127.0.0.1:{target.port}".encode()), "http"))
        for name, sock in sockets.items():
            with self.subTest(state=name):
                answer, closed = read_until_closed(sock, 8)
                self.assertTrue(closed, f"{name}: still open long after the handshake timeout")
                self.assertIn(answer, (b"", b"\x05\x00"))
        for thread in threads:
            thread.join(60)
            self.assertFalse(thread.is_alive())
        for name in drips:
            with self.subTest(state=name):
                self.assertTrue(dropped[name], f"{name}: a byte-at-a-time client was never dropped")
        # a refused client that sends without end is cut off (MAX_DRAIN_BYTES, or the closing
        # timeout), it does not get to stream into the proxy forever
        with connect(proxy.port) as sock:
            sock.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n")
            cut = False
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    sock.sendall(b"x" * 65536)
                except socket.timeout:
                    continue
                except OSError:
                    cut = True
                    break
        self.assertTrue(cut, "a refused client could keep sending for 20 s")
        self.assertTrue(echo_through(proxy.port, good))
        deadline = time.monotonic() + 5
        while proxy.server.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(len(proxy.server.connections), 0, "connections leaked in the server")
        self.assertIsNone(proxy.error)
        self.assertTrue(proxy.thread.is_alive())


class HalfOpenTest(ProxyTestCase):
    """2000 clients that connect and send nothing."""

    COUNT = 2000

    def open_idle(self, port):
        raise_nofile(self, self.COUNT + 512)
        idle = []
        self.addCleanup(lambda: [s.close() for s in idle])
        for _ in range(self.COUNT):
            sock = socket.socket()
            sock.settimeout(T)
            sock.connect((LOOP, port))
            idle.append(sock)
        return idle

    def test_half_open_under_the_limit(self):
        target = self.upstream("echo")
        proxy = self.proxy(["--allow", f"127.0.0.1:{target.port}", "--max-connections", "4096"])
        idle = self.open_idle(proxy.port)
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", target.port)))
        self.assertTrue(echo_through(proxy.port, http_connect(f"127.0.0.1:{target.port}".encode()), "http"))
        self.assertGreater(proxy.fd_count(), self.COUNT, "the idle connections were not held open")
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 10
        while proxy.fd_count() > 100 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertLess(proxy.fd_count(), 100, "descriptors of closed clients were not released")
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", target.port)))
        self.assert_alive(proxy)

    def test_half_open_over_the_limit_slots_are_reclaimed(self):
        """Default limit (1024): silent clients are dropped (evicted by newcomers, or at the
        handshake timeout, 2 s here), a client arriving meanwhile gets an answer or a close
        (never a hang), and the proxy serves again afterwards."""
        target = self.upstream("echo")
        proxy = self.proxy(["--allow", f"127.0.0.1:{target.port}"], handshake_timeout=2.0)
        idle = self.open_idle(proxy.port)
        answer, closed = exchange(proxy.port, socks5_ip("127.0.0.1", target.port), timeout=10)
        self.assertTrue(closed or granted("socks5", answer), answer)
        self.assertTrue(granted("socks5", answer) or refused("socks5", answer) or answer == b"", answer)
        for sock in idle[:50]:
            _, closed = read_until_closed(sock, 10)
            self.assertTrue(closed)
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", target.port)))
        self.assert_alive(proxy)

    def test_half_open_over_the_limit_good_client_served_meanwhile(self):
        """With the default limit, 2000 silent connections must not hold every slot for
        HANDSHAKE_TIMEOUT: a well-behaved client arriving meanwhile is served (the proxy evicts
        the oldest connection still in its handshake)."""
        target = self.upstream("echo")
        proxy = self.proxy(["--allow", f"127.0.0.1:{target.port}"])
        self.open_idle(proxy.port)
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", target.port)),
                        "a good client was refused while silent connections held every slot")


    def test_lingering_refusals_do_not_hold_slots(self):
        """Clients that get a refusal, read it, and then neither close nor send: they are done,
        and must not keep a well-behaved client out (--max-connections 16, 40 such clients)."""
        target = self.upstream("echo")
        denied = self.upstream("record")
        proxy = self.proxy(["--allow", f"127.0.0.1:{target.port}", "--max-connections", "16"])
        lingering = []
        self.addCleanup(lambda: [s.close() for s in lingering])
        for i in range(40):
            sock = connect(proxy.port)
            lingering.append(sock)
            if i % 2:
                sock.sendall(socks5_ip("127.0.0.1", denied.port))
                answer = recv_exactly(sock, 12)
            else:
                sock.sendall(http_connect(f"127.0.0.1:{denied.port}".encode()))
                answer = recv_exactly(sock, 12)
            self.assertTrue(answer.startswith((b"\x05\x00\x05\x02", b"HTTP/1.1 403", b"\x05\x00\x05\x01",
                                               b"HTTP/1.1 503")) or answer == b"", answer)
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", target.port)),
                        "a good client was refused while refused clients lingered in every slot")
        self.assertEqual(denied.accepted, 0)
        self.assert_alive(proxy)


class BackPressureTest(ProxyTestCase):
    def test_clients_that_never_read_keep_memory_bounded(self):
        flooder = self.upstream("flood", flood=200 << 20)
        target = self.upstream("echo")
        proxy = self.proxy(["--allow", f"127.0.0.1:{flooder.port}", "--allow", f"127.0.0.1:{target.port}"])
        baseline = proxy.rss_kb()
        readers = []
        for _ in range(4):
            sock = connect(proxy.port)
            self.addCleanup(sock.close)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(socks5_ip("127.0.0.1", flooder.port))
            self.assertTrue(granted("socks5", recv_exactly(sock, 12)))
            readers.append(sock)            # and never read from again
        peak = baseline
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            peak = max(peak, proxy.rss_kb())
            if flooder.stalled.is_set() and len(flooder.records) >= 4:
                break
            if flooder.sent >= 4 * (200 << 20):
                break
            time.sleep(0.05)
        # meanwhile another client is served
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", target.port)))
        peak = max(peak, proxy.rss_kb())
        self.assertTrue(flooder.stalled.is_set(), f"the upstream was never held back ({flooder.sent} bytes sent)")
        self.assertLess(flooder.sent, 200 << 20, "the proxy read far more than it could deliver")
        self.assertLess(peak, 100 * 1024, f"proxy RSS reached {peak} kB (baseline {baseline} kB)")
        self.assert_alive(proxy)


class ConnectionFloodTest(ProxyTestCase):
    def test_flood_over_max_connections(self):
        target = self.upstream("hold")
        echo = self.upstream("echo")
        limit = 16
        proxy = self.proxy(["--allow", f"127.0.0.1:{target.port}", "--allow", f"127.0.0.1:{echo.port}",
                            "--max-connections", str(limit)])
        socks5 = socks5_ip("127.0.0.1", target.port)
        http = http_connect(f"127.0.0.1:{target.port}".encode())
        clients = []
        self.addCleanup(lambda: [s.close() for s, _ in clients])
        for i in range(300):
            proto, payload = ("socks5", socks5) if i % 2 else ("http", http)
            sock = socket.socket()
            sock.settimeout(T)
            try:
                sock.connect((LOOP, proxy.port))
                sock.sendall(payload)
            except OSError:
                pass
            clients.append((sock, proto))
        outcome = {"granted": 0, "refused": 0, "closed": 0}
        for sock, proto in clients:
            head = 12 if proto == "socks5" else 39
            try:
                answer = recv_exactly(sock, head, timeout=10)
            except socket.timeout:
                self.fail("a flood client got neither an answer nor a close")
            except OSError:
                answer = b""
            if granted(proto, answer):
                outcome["granted"] += 1
            elif answer == b"":
                outcome["closed"] += 1
            else:
                rest, closed = read_until_closed(sock, 10)
                self.assertTrue(closed)
                self.assertTrue(refused(proto, answer + rest), answer + rest)
                if proto == "http":
                    self.assertIn(b"503", answer)
                outcome["refused"] += 1
        self.assertEqual(outcome["granted"], limit, outcome)
        self.assertGreater(outcome["refused"], 0, outcome)
        reasons = {r["reason"] for r in proxy.records() if r["decision"] == "deny"}
        self.assertEqual(reasons, {"too-many-connections"})
        # the granted tunnels stay open and idle: the daemon must not spin
        cpu = proxy.cpu_seconds()
        time.sleep(2.0)
        self.assertLess(proxy.cpu_seconds() - cpu, 0.5, "CPU burnt while idle after the flood")
        for sock, _ in clients:
            sock.close()
        deadline = time.monotonic() + 10
        while proxy.fd_count() > 40 and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu = proxy.cpu_seconds()
        time.sleep(1.5)
        self.assertLess(proxy.cpu_seconds() - cpu, 0.4, "CPU burnt while idle after the flood closed")
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", echo.port)))
        self.assert_alive(proxy)


class DescriptorExhaustionTest(ProxyTestCase):
    def test_out_of_descriptors(self):
        """The proxy runs with RLIMIT_NOFILE 128 (each relayed connection costs 6 descriptors:
        two sockets and two splice pipes), so it lowers its connection limit to what the
        descriptors carry. Tunnels and silent clients beyond that must not run it out of
        descriptors, make it crash or spin, or keep a good client out."""
        target = self.upstream("echo")
        proxy = self.proxy(["--allow", f"127.0.0.1:{target.port}"], handshake_timeout=2.0, nofile=128)
        request = socks5_ip("127.0.0.1", target.port)
        tunnels = []
        self.addCleanup(lambda: [s.close() for s in tunnels])
        worked = 0
        for _ in range(16):
            sock = connect(proxy.port)
            tunnels.append(sock)
            try:
                sock.sendall(request + b"ping")
                answer = recv_exactly(sock, 16, timeout=3)
            except OSError:
                continue
            worked += answer == b"\x05\x00\x05\x00" + answer[4:12] + b"ping"
        self.assertGreater(worked, 0)
        idle = []
        self.addCleanup(lambda: [s.close() for s in idle])
        for _ in range(80):
            idle.append(connect(proxy.port))
        time.sleep(0.5)
        self.assertLess(proxy.fd_count(), 128, "the proxy ran out of descriptors")
        cpu = proxy.cpu_seconds()
        time.sleep(2.0)
        self.assertLess(proxy.cpu_seconds() - cpu, 0.5, "CPU burnt while out of descriptors")
        self.assert_alive(proxy)
        for sock in tunnels + idle:
            sock.close()
        ok = False
        deadline = time.monotonic() + 15
        while not ok and time.monotonic() < deadline:
            ok = echo_through(proxy.port, request)
            if not ok:
                time.sleep(0.2)
        self.assertTrue(ok, "no service after descriptors were freed")
        self.assert_alive(proxy)


CONTROL = set(range(0x00, 0x20)) | set(range(0x7f, 0xa0))


class OutputInjectionTest(ProxyTestCase):
    """A requested name is hostile text: it must not reach the user's terminal (the summary line
    printed at exit, --verbose lines) or a log consumer with control characters in it."""

    HOSTILE = [b"\x1b]0;owned\x07\x1b[2J\x1b[31mEVIL", b"evil.example.net\r\nsocks_filter: 0 allowed, 0 denied",
               b"a\x9b31mb", b"\x1b[1;31mred\x1b[0m"]

    def test_hostile_names_are_escaped_in_output(self):
        proxy = self.proxy(["--allow", "example.com", "--verbose"])
        for name in self.HOSTILE:
            for payload, proto in ((socks5_name(name, 443), "socks5"), (socks4a_name(name, 443), "socks4a")):
                answer, _ = exchange(proxy.port, payload)
                self.assertTrue(refused(proto, answer), answer)
        hosts = [r["host"] for r in proxy.records()]
        self.assertEqual(len(hosts), 2 * len(self.HOSTILE))
        proxy.stop()
        err = proxy.stderr()
        with self.subTest(part="log"):
            for host in hosts:
                self.assertFalse(CONTROL & {ord(c) for c in host}, f"raw control characters in log host {host!r}")
        with self.subTest(part="stderr"):
            lines = err.split("\n")
            self.assertEqual(lines[-1], "")
            text = "".join(lines)
            self.assertFalse(CONTROL & {ord(c) for c in text}, f"raw control characters on stderr: {err!r}")
            self.assertEqual(len(lines) - 1, 2 * len(self.HOSTILE) + 1, f"forged lines on stderr: {err!r}")


class BoundedStateTest(unittest.TestCase):
    def test_distinct_denied_names_do_not_grow_state_without_bound(self):
        """Every denied request with a new name must not add to what the proxy keeps for the
        rest of its life: 6000 distinct denied names (a hostile agent can send millions) must
        not leave 6000 entries behind (here: the per-host tally behind the exit summary,
        ~340 bytes each, never freed)."""
        proxy = InProcessProxy(["example.com"])
        self.addCleanup(proxy.stop)
        count = 6000

        def one(i):
            name = f"n{i:05d}.{'a' * 60}.{'b' * 60}.{'c' * 60}.evil.net".encode()
            try:
                exchange(proxy.port, socks5_name(name, 443))
            except OSError:
                pass
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(count)))
        self.assertIsNone(proxy.error)
        self.assertGreaterEqual(proxy.server.stats["denied"], count)
        kept = len(proxy.server.stats["denied_hosts"])
        self.assertLess(kept, count // 2, f"{kept} distinct denied hosts kept in memory")


# ---------------------------------------------------------------------------------------------
# TLS server name check: needs an upstream on port 443, so it runs in a network namespace the
# test creates (`unshare -rn`: root of a new user and network namespace, its own loopback).

def _bring_loopback_up():
    import fcntl
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, 0x8913, request))[1]     # SIOCGIFFLAGS
        fcntl.ioctl(sock, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))         # SIOCSIFFLAGS IFF_UP
    finally:
        sock.close()


class FakeDns:
    """A UDP DNS server on NAMESERVER:53 (inside the namespace). The first A query for a name is
    answered with a public address, every later one with 127.0.0.1: DNS rebinding. AAAA and
    other queries get an empty answer. Every query is recorded."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((NAMESERVER, 53))
        self.sock.settimeout(0.2)
        self.queries = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                labels, at = [], 12
                while data[at]:
                    labels.append(data[at + 1:at + 1 + data[at]].decode("ascii", "replace"))
                    at += 1 + data[at]
                qtype = struct.unpack("!H", data[at + 1:at + 3])[0]
                question = data[12:at + 5]
            except (IndexError, struct.error):
                continue
            name = ".".join(labels).lower()
            earlier = sum(1 for n, t in self.queries if n == name and t == 1)
            self.queries.append((name, qtype))
            answers = []
            if qtype == 1:
                address = "93.184.216.34" if earlier == 0 else "127.0.0.1"
                answers.append(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton(address))
            reply = (data[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, len(answers), 0, 0) + question
                     + b"".join(answers))
            try:
                self.sock.sendto(reply, peer)
            except OSError:
                pass

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def _rebinding_case():
    """An allowed name whose first lookup is public and every later one loopback."""
    dns = FakeDns()
    upstream = Upstream("record", host=LOOP)
    proxy = ProxyProcess(["--allow", "rebind.example.com"])
    result = {}
    try:
        name = b"rebind.example.com"
        answers = []
        for proto, payload in attempts_for(name, upstream.port, ("socks5", "http-connect", "socks4a", "http")):
            answers.append((proto, exchange(proxy.port, payload, 10)[0]))
        result["granted"] = [granted(proto, answer) for proto, answer in answers]
        result["refused"] = [refused(proto, answer) for proto, answer in answers]
        result["a-queries"] = sum(1 for n, t in dns.queries if n == "rebind.example.com" and t == 1)
        result["requests"] = len(answers)
        result["decisions"] = [(r["decision"], r["reason"]) for r in proxy.records()]
        result["closes"] = [r["reason"] for r in proxy.records("close")]
        result["upstream-accepted"] = upstream.accepted
    finally:
        proxy.stop()
        upstream.stop()
        dns.stop()
    return result


def _sni_child():
    """Run inside the namespace: every SNI case against a proxy and an upstream on 127.0.0.1:443.
    Prints one JSON object with what each case observed."""
    _bring_loopback_up()
    upstream = Upstream("record", host=LOOP, port=443, idle=1.0)
    proxy = ProxyProcess(["--allow", "loop.example.com:443", "--allow", f"{LOOP}:443", "--verbose"],
                         handshake_timeout=1.5)
    results = {}
    try:
        hellos = {
            "real-match": client_hello("loop.example.com"),
            "real-mismatch": client_hello("evil.example.net"),
            "real-no-sni": client_hello(None),
            "built-match-upper": built_client_hello(b"LOOP.Example.COM"),
            "built-mismatch": built_client_hello(b"evil.example.net"),
            "built-mismatch-suffix": built_client_hello(b"loop.example.com.evil.net"),
            "built-mismatch-prefix": built_client_hello(b"xloop.example.com"),
            "built-mismatch-nul": built_client_hello(b"loop.example.com\x00.evil.net"),
            "built-mismatch-empty": built_client_hello(b""),
            "built-mismatch-escapes": built_client_hello(b"\x1b]0;owned\x07\x1b[2J\r\nsocks_filter: x\x9b"),
            "fragmented-match": built_client_hello(b"loop.example.com", pieces=5),
            "fragmented-mismatch": built_client_hello(b"evil.example.net", pieces=5),
            "not-tls": b"GET / HTTP/1.1\r\nHost: evil.example.net\r\n\r\n",
        }
        openers = {
            "http": (http_connect(b"loop.example.com:443"), 39),
            "socks5": (socks5_name(b"loop.example.com", 443), 12),
            "socks4a": (socks4a_name(b"loop.example.com", 443), 8),
        }
        for case, hello in hellos.items():
            for proto, (opener, head) in openers.items():
                ways = ("whole", "drip", "pipelined") if case in ("real-match", "real-mismatch") else ("whole",)
                for way in ways:
                    key = f"{case}/{proto}" + ("" if way == "whole" else f"/{way}")
                    before = len(proxy.records("decision"))
                    with connect(proxy.port, 10) as sock:
                        if way == "pipelined":      # the hello sent before the tunnel is open
                            sock.sendall(opener + hello)
                            opened = recv_exactly(sock, head, 10)
                        else:
                            sock.sendall(opener)
                            opened = recv_exactly(sock, head, 10)
                        if way == "drip":
                            for i in range(len(hello)):
                                sock.sendall(hello[i:i + 1])
                        elif way == "whole":
                            sock.sendall(hello)
                        sock.shutdown(socket.SHUT_WR)
                        answer, closed = read_until_closed(sock, 10)
                    try:
                        received = upstream.next_record(12)
                    except queue.Empty:
                        received = None
                    reasons = [r["reason"] for r in proxy.records("decision")[before:]]
                    results[key] = {"granted": granted(proto, opened), "closed": closed,
                                    "received": None if received is None else received.hex(),
                                    "sent": hello.hex(), "reasons": reasons}
        # a partial ClientHello that never completes: closed at the handshake timeout
        with connect(proxy.port, 10) as sock:
            sock.sendall(http_connect(b"loop.example.com:443"))
            recv_exactly(sock, 39, 10)
            sock.sendall(client_hello("loop.example.com")[:40])
            answer, closed = read_until_closed(sock, 10)
        received = upstream.next_record(12)
        results["stalled"] = {"closed": closed, "received": received.hex(),
                              "reasons": [r["reason"] for r in proxy.records("decision")[-1:]]}
        closes = [r for r in proxy.records("close") if r["decision"] == "deny"]
        results["close-records"] = len(closes)
        results["alive"] = proxy.alive()
        proxy.stop()
        results["stderr"] = proxy.stderr()
        results["log-details"] = [r.get("detail", "") for r in proxy.records(None)]
        # SNI-stage stalls (tunnel open, no ClientHello) at the connection limit
        limited = ProxyProcess(["--allow", "loop.example.com:443", "--allow", f"{LOOP}:443",
                                "--max-connections", "4"])
        stalled = []
        try:
            for _ in range(4):
                sock = connect(limited.port, 10)
                stalled.append(sock)
                sock.sendall(http_connect(b"loop.example.com:443"))
                recv_exactly(sock, 39, 10)
            with connect(limited.port, 10) as sock:
                sock.sendall(http_connect(b"loop.example.com:443"))
                opened = recv_exactly(sock, 39, 10)
                results["sni-stall-good-client"] = granted("http", opened)
        finally:
            for sock in stalled:
                sock.close()
            limited.stop()
    finally:
        proxy.stop()
        upstream.stop()
    results["rebind"] = _rebinding_case()
    print(json.dumps(results))


class SniCheckTest(unittest.TestCase):
    MISMATCH = ("real-mismatch", "built-mismatch", "built-mismatch-suffix", "built-mismatch-prefix",
                "built-mismatch-nul", "built-mismatch-escapes",
                "built-mismatch-empty", "fragmented-mismatch")
    FLOW = ("real-match", "built-match-upper", "fragmented-match")
    REFUSED = {"real-no-sni": "no-sni", "not-tls": "not-tls"}   # closed with their own reason

    @classmethod
    def setUpClass(cls):
        cls.results = None
        cls.directory = tempfile.mkdtemp(prefix="bw-adv-sni-")
        try:
            prefix = namespace_prefix(cls.directory, net=True)
            if prefix is None:
                cls.reason = "needs `unshare -rnm` and `mount` (a private network namespace for port 443)"
                return
            code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                    "from tests import test_proxy_adversarial as t; t._sni_child()")
            run = subprocess.run(prefix + [sys.executable, "-c", code, REPO], capture_output=True,
                                 timeout=150, cwd=REPO)
            if run.returncode != 0:
                raise AssertionError(f"SNI child failed: {run.stderr.decode()[-4000:]}")
            cls.results = json.loads(run.stdout.decode().strip().splitlines()[-1])
        finally:
            shutil.rmtree(cls.directory, ignore_errors=True)

    def setUp(self):
        if self.results is None:
            skip_or_fail(self, self.reason)

    def test_mismatched_server_name_closes_the_tunnel(self):
        for key, seen in self.results.items():
            if key.split("/")[0] not in self.MISMATCH:
                continue
            with self.subTest(case=key):
                self.assertTrue(seen["granted"], "the tunnel should open before the hello")
                self.assertTrue(seen["closed"])
                self.assertEqual(seen["received"], "", "the upstream received bytes of the hello")
                self.assertEqual(seen["reasons"], ["sni-mismatch"],
                                 "a tunnel refused for its name must count as denied only")
        self.assertTrue(self.results["alive"])

    def test_matching_hello_flows(self):
        for key, seen in self.results.items():
            if key.split("/")[0] not in self.FLOW:
                continue
            with self.subTest(case=key):
                self.assertTrue(seen["granted"])
                self.assertEqual(seen["received"], seen["sent"], "the hello did not reach the upstream intact")
                self.assertNotIn("sni-mismatch", seen["reasons"])

    def test_missing_sni_or_no_tls_closes_the_tunnel(self):
        for key, seen in self.results.items():
            reason = self.REFUSED.get(key.split("/")[0])
            if reason is None:
                continue
            with self.subTest(case=key):
                self.assertTrue(seen["closed"])
                self.assertEqual(seen["received"], "", "the upstream received bytes")
                self.assertEqual(seen["reasons"], [reason])

    def test_incomplete_hello_is_closed_at_the_timeout(self):
        seen = self.results["stalled"]
        self.assertTrue(seen["closed"])
        self.assertEqual(seen["received"], "")
        self.assertEqual(seen["reasons"], ["tls-timeout"])

    def test_hostile_server_name_is_escaped(self):
        text = self.results["stderr"] + "".join(self.results["log-details"])
        self.assertIn("sni-mismatch", self.results["stderr"])
        self.assertFalse(CONTROL & {ord(c) for c in text.replace("\n", "")},
                         f"raw control characters from a ClientHello reached stderr/log: {text[-2000:]!r}")

    def test_stalled_tunnels_do_not_hold_every_slot(self):
        """Tunnels to an allowed :443 name whose client never sends its ClientHello are still in
        a handshake: at the connection limit they must not keep a well-behaved client out."""
        self.assertTrue(self.results["sni-stall-good-client"],
                        "4 tunnels stalled before their ClientHello filled --max-connections 4")

    def test_dns_rebinding_never_reaches_loopback(self):
        """One lookup per request; the connection goes to the address that was checked. The fake
        DNS answers public first, then 127.0.0.1: a proxy that looked up the name again to
        connect would reach the loopback upstream."""
        seen = self.results["rebind"]
        self.assertEqual(seen["upstream-accepted"], 0, seen)
        self.assertEqual(seen["a-queries"], seen["requests"], f"not exactly one lookup per request: {seen}")
        self.assertFalse(any(seen["granted"]), seen)
        self.assertTrue(all(seen["refused"]), seen)
        # first request: public answer, allowed, unreachable in the namespace; then private-address
        self.assertEqual(seen["decisions"][0], ["allow", "allowed-by-rule"], seen)
        self.assertEqual(seen["closes"][:1], ["unreachable"], seen)
        self.assertEqual(seen["decisions"][1:], [["deny", "private-address"]] * (seen["requests"] - 1), seen)

    def test_sni_mismatch_logged_as_close(self):
        mismatches = sum(1 for key in self.results if key.split("/")[0] in self.MISMATCH)
        self.assertGreaterEqual(self.results["close-records"], mismatches + 1)


# ---------------------------------------------------------------------------------------------

class FuzzTest(ProxyTestCase):
    SEED = 0x5EED5
    COUNT = 3000

    def test_mutated_handshakes(self):
        allowed = self.upstream("echo")
        denied = self.upstream("record")
        A, D = allowed.port, denied.port
        proxy = self.proxy(["--allow", f"127.0.0.1:{A}", "--allow", f"loop.example.com:{A}",
                            "--allow-private"], handshake_timeout=1.0, hosts=True)
        a, d = f"127.0.0.1:{A}".encode(), f"127.0.0.1:{D}".encode()
        templates = [
            socks5_ip("127.0.0.1", A), socks5_ip("127.0.0.1", D), socks5_name(b"loop.example.com", A),
            socks5_name(b"loop.example.com", D), socks5_name(b"127.0.0.1", D), socks5_ip("::1", D),
            socks4_ip("127.0.0.1", A), socks4_ip("127.0.0.1", D), socks4a_name(b"loop.example.com", A),
            socks4a_name(b"loop.example.com", D),
            http_connect(a), http_connect(d), http_connect(b"loop.example.com:" + str(A).encode()),
            http_get(a), http_get(d), http_get(b"loop.example.com:" + str(D).encode()),
            b"POST http://" + a + b"/ HTTP/1.1\r\nHost: " + a + b"\r\nContent-Length: 3\r\n\r\nabc",
            b"CONNECT " + a + b" HTTP/1.1\r\nHost: " + d + b"\r\n\r\n",
        ]
        rng = random.Random(self.SEED)

        def mutate():
            data = bytearray(rng.choice(templates))
            for _ in range(rng.randint(1, 3)):
                op = rng.randrange(7)
                if op == 0 and data:                               # flip bytes
                    for _ in range(rng.randint(1, 4)):
                        data[rng.randrange(len(data))] = rng.randrange(256)
                elif op == 1 and data:                             # truncate
                    del data[rng.randrange(len(data)):]
                elif op == 2:                                      # insert random bytes
                    at = rng.randint(0, len(data))
                    data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
                elif op == 3 and len(data) > 4:                    # length/port fields
                    at = rng.choice([1, 4, 7, 8] if len(data) > 8 else [1, 2, 3])
                    data[at] = rng.choice([0, 1, 2, 3, 4, 5, 0x7f, 0xfe, 0xff, rng.randrange(256)])
                elif op == 4:                                      # random bytes after a version
                    data = bytearray([rng.choice([4, 5, 0x43, 0x47, rng.randrange(256)])])
                    data += bytes(rng.randrange(256) for _ in range(rng.randint(0, 600)))
                elif op == 5:                                      # splice two templates
                    other = rng.choice(templates)
                    data = data[:rng.randint(0, len(data))] + other[rng.randint(0, len(other)):]
                elif op == 6 and data:                             # duplicate a slice
                    i = rng.randrange(len(data))
                    data[i:i] = data[i:i + rng.randint(1, 40)]
            return bytes(data)

        cases = [mutate() for _ in range(self.COUNT)]
        hung = []

        def run(payload):
            try:
                with connect(proxy.port, 8) as sock:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    _, closed = read_until_closed(sock, 8)
                    if not closed:
                        hung.append(payload)
            except OSError:
                pass

        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(run, cases))
        self.assertEqual(hung, [], f"{len(hung)} connections never closed, e.g. {hung[:3]!r}")
        self.assert_alive(proxy)
        self.assertTrue(echo_through(proxy.port, socks5_ip("127.0.0.1", A)))
        self.assertEqual(denied.accepted, 0, "a fuzzed handshake reached the denied upstream")
        records = proxy.records()
        self.assertGreater(len(records), self.COUNT // 2)
        allowed_records = [r for r in records if r["decision"] == "allow"]
        self.assertGreater(len(allowed_records), 0, "no mutated request was allowed at all")
        for record in allowed_records:
            self.assertEqual(record["port"], A, record)
            self.assertIn(record["host"], ("127.0.0.1", "loop.example.com"), record)
        self.assertGreater(len([r for r in records if r["reason"] == "bad-request"]), 100)


if __name__ == "__main__":
    unittest.main()


# ---------------------------------------------------------------------------------------------
# A second ClientHello after a TLS 1.3 HelloRetryRequest (attacker review, SNI bypass)

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
    extensions = b""
    if sni is not None:
        entry = b"\x00" + struct.pack("!H", len(sni)) + sni
        extensions += extension(0, struct.pack("!H", len(entry)) + entry)
    extensions += extension(43, b"\x02\x03\x04")
    listed = b"".join(struct.pack("!H", g) for g in groups)
    extensions += extension(10, struct.pack("!H", len(listed)) + listed)
    extensions += extension(13, b"\x00\x04\x04\x03\x08\x04")
    key = {X25519: os.urandom(32), P256: P256_GENERATOR}.get(share)
    shares = struct.pack("!HH", share, len(key)) + key if key else b""
    extensions += extension(51, struct.pack("!H", len(shares)) + shares)
    body = (b"\x03\x03" + os.urandom(32) + b"\x20" + b"s" * 32 + b"\x00\x02\x13\x01\x01\x00"
            + struct.pack("!H", len(extensions)) + extensions)
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    size = -(-len(handshake) // pieces)
    return b"".join(b"\x16\x03\x01" + struct.pack("!H", len(part)) + part
                    for part in (handshake[i:i + size] for i in range(0, len(handshake), size)))


def server_hello(random, pieces=1):
    """A ServerHello record (HRR_RANDOM: a HelloRetryRequest), split over `pieces` records."""
    body = b"\x03\x03" + random + b"\x00\x13\x01\x00" + struct.pack("!H", 6) + b"\x00\x2b\x00\x02\x03\x04"
    handshake = b"\x02" + len(body).to_bytes(3, "big") + body
    size = -(-len(handshake) // pieces)
    return b"".join(b"\x16\x03\x03" + struct.pack("!H", len(part)) + part
                    for part in (handshake[i:i + size] for i in range(0, len(handshake), size)))


class HelloRetryParsingTest(unittest.TestCase):
    """The pure functions behind the HelloRetryRequest check."""

    def test_server_hello_kind(self):
        warning = b"\x15\x03\x03\x00\x02\x01\x70"           # unrecognized_name, warning level
        cases = [
            (server_hello(HRR_RANDOM), "hello-retry"),
            (server_hello(HRR_RANDOM) + CCS, "hello-retry"),
            (server_hello(HRR_RANDOM, pieces=4), "hello-retry"),
            (warning + server_hello(HRR_RANDOM), "hello-retry"),
            (server_hello(os.urandom(32)), "server-hello"),
            (server_hello(HRR_RANDOM[:31] + b"\0"), "server-hello"),
            (server_hello(HRR_RANDOM)[:30], None),
            (server_hello(HRR_RANDOM, pieces=4)[:40], None),
            (b"", None),
            (b"\x16\x03", None),
        ]
        for data, expected in cases:
            with self.subTest(data=data[:48].hex()):
                self.assertEqual(socks_filter.server_hello_kind(data), expected)

    def test_malformed_answers_raise(self):
        for data in (b"HTTP/1.1 200 OK\r\n\r\n", b"SSH-2.0-x\r\n",
                     b"\x17\x03\x03\x00\x02hi" + server_hello(HRR_RANDOM),      # data first
                     CCS + server_hello(HRR_RANDOM),                            # CCS first
                     b"\x16\x03\x03\x00\x04\x0b\x00\x00\x00",                   # not a ServerHello
                     b"\x16\x03\x03\xff\xff",                                   # oversized record
                     b"\x15\x03\x03\x00\x02\x01\x70" * 10000):                  # endless alerts
            with self.subTest(data=data[:24].hex()):
                with self.assertRaises(socks_filter.ProtocolError):
                    socks_filter.server_hello_kind(data)

    def test_retry_hello_start(self):
        evil, good = key_share_hello(b"evil.example.net"), key_share_hello(b"loop.example.com")
        cases = [
            (good, ("sni", "loop.example.com")),
            (CCS + evil, ("sni", "evil.example.net")),
            (CCS + key_share_hello(b"evil.example.net", pieces=6), ("sni", "evil.example.net")),
            (CCS + key_share_hello(None), ("no-sni",)),
            (CCS + CCS + good, ("tls-change-cipher-spec-first",)),
            (b"\x14\x03\x03\x00\x02\x01\x01" + good, ("bad-client-hello",)),
            (CCS + b"\x15\x03\x03\x00\x02\x01\x00", ("tls-alert-first",)),
            (CCS[:4], None),
            (CCS + evil[:20], None),
        ]
        for data, expected in cases:
            with self.subTest(data=data[:24].hex()):
                found = socks_filter.retry_hello_start(data)
                self.assertEqual(found if found is None else found[:len(expected)], expected)

    def test_the_reason_is_known(self):
        import bw_lib
        self.assertIn("bad-server-hello", socks_filter.TUNNEL_REFUSALS)
        self.assertIn("bad-server-hello", bw_lib.REASONS)

    def test_client_hello_end(self):
        hello = key_share_hello(b"loop.example.com", pieces=3)
        self.assertEqual(socks_filter.client_hello_end(hello + CCS), len(hello))
        # a second hello hidden in the first one's last record is refused
        one = key_share_hello(b"loop.example.com")[5:]
        two = key_share_hello(b"evil.example.net")[5:]
        both = b"\x16\x03\x01" + struct.pack("!H", len(one + two)) + one + two
        with self.assertRaises(socks_filter.ProtocolError):
            socks_filter.client_hello_end(both)
        self.assertEqual(socks_filter.tunnel_start(both), ("sni", "loop.example.com"))


STDBUF = ["stdbuf", "-o0", "-e0"] if shutil.which("stdbuf") else []    # s_server's lines as they come


class TlsServer:
    """`openssl s_server` on loopback, its groups limited to P-256 so that a ClientHello with
    only an X25519 key share gets a HelloRetryRequest. -servername makes it print the name its
    servername callback saw for every ClientHello; -rev echoes lines reversed."""

    def __init__(self, directory):
        self.out_path = os.path.join(directory, "s_server.out")
        key, cert = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=loop.example.com",
                        "-days", "2", "-keyout", key, "-out", cert],
                       check=True, capture_output=True, timeout=30)
        with open(self.out_path, "wb") as out:
            self.process = subprocess.Popen(
                [*STDBUF, "openssl", "s_server", "-accept", f"{LOOP}:0", "-cert", cert, "-key", key,
                 "-cert2", cert, "-key2", key, "-servername", "loop.example.com",
                 "-groups", "P-256", "-rev", "-trace"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "ACCEPT" not in self.output():
            time.sleep(0.05)
        accept = [line for line in self.output().splitlines() if line.startswith("ACCEPT")]
        if not accept:
            self.stop()
            raise AssertionError(f"s_server did not start: {self.output()[-2000:]}")
        self.port = int(accept[0].rpartition(":")[2])

    def output(self):
        with open(self.out_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def names_seen(self):
        """The server names its servername callback saw, one per ClientHello that had one."""
        return [line.split('"')[1] for line in self.output().splitlines()
                if line.startswith("Hostname in TLS extension:")]

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def read_until(sock, wanted, timeout=T):
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


class HelloRetryTest(ProxyTestCase):
    """A tunnel to a name opens with a ClientHello naming that host; a TLS 1.3 server that
    answers with a HelloRetryRequest reads a second ClientHello, whose name it takes too. The
    attack: hello 1 names the allowed host with a key share the server refuses, hello 2 (after
    the HelloRetryRequest) names another site. Checked on the host side by what the real TLS
    server's servername callback saw."""

    def setUp(self):
        if not shutil.which("openssl"):
            skip_or_fail(self, "needs the openssl command (apt-get install openssl)")
        directory = tempfile.mkdtemp(prefix="bw-adv-hrr-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.tls = TlsServer(directory)
        self.addCleanup(self.tls.stop)
        port = self.tls.port
        self.filter = self.proxy(["--allow", f"loop.example.com:{port}", "--allow", f"{LOOP}:{port}"],
                                 handshake_timeout=3, hosts=True)

    def tunnel(self):
        sock = connect(self.filter.port, 10)
        sock.sendall(http_connect(b"loop.example.com:%d" % self.tls.port))
        self.assertTrue(granted("http", recv_exactly(sock, 39, 10)))
        return sock

    def retry(self, second, first=None):
        """Hello 1 for the allowed name, the server's answer, then `second`: (answer to hello
        1, what came after `second`, whether the tunnel was closed)."""
        with self.tunnel() as sock:
            sock.sendall(first or key_share_hello(b"loop.example.com"))
            answer = read_until(sock, HRR_RANDOM, 10)
            try:
                sock.sendall(second)
            except OSError:             # closed at its first bad byte
                pass
            after, closed = read_until_closed(sock, 10)
        return answer, after, closed

    def reasons(self):
        wait_for = time.monotonic() + 5
        while time.monotonic() < wait_for and not any(r["reason"] != "allowed-by-rule"
                                                      for r in self.filter.records()):
            time.sleep(0.05)
        return [r["reason"] for r in self.filter.records()]

    def test_second_hello_for_another_site_is_refused(self):
        cases = {
            "ccs-then-evil": CCS + key_share_hello(b"evil.example.net", share=P256),
            "evil": key_share_hello(b"evil.example.net", share=P256),
            "evil-fragmented": CCS + key_share_hello(b"evil.example.net", share=P256, pieces=4),
            "evil-dripped": (CCS + key_share_hello(b"evil.example.net", share=P256))[:150],
        }
        for case, second in cases.items():
            with self.subTest(case=case):
                before = len(self.tls.names_seen())
                records = len(self.filter.records())
                if case == "evil-dripped":      # the first 150 bytes 7 at a time, then the rest
                    full = CCS + key_share_hello(b"evil.example.net", share=P256)
                    with self.tunnel() as sock:
                        sock.sendall(key_share_hello(b"loop.example.com"))
                        answer = read_until(sock, HRR_RANDOM, 10)
                        for i in range(0, len(full), 7):
                            sock.sendall(full[i:i + 7])
                        after, closed = read_until_closed(sock, 10)
                else:
                    answer, after, closed = self.retry(second)
                self.assertIn(HRR_RANDOM, answer, "the server did not ask for another hello")
                # on the host: the TLS server's name callback saw only the allowed name
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and len(self.tls.names_seen()) == before:
                    time.sleep(0.05)
                self.assertEqual(self.tls.names_seen()[before:], ["loop.example.com"])
                self.assertNotIn("evil.example.net", self.tls.output())
                self.assertTrue(closed)
                self.assertEqual(after, b"")
                reasons = [r["reason"] for r in self.filter.records()[records:]]
                self.assertEqual(reasons, ["allowed-by-rule", "sni-mismatch"])
        self.assert_alive(self.filter)
        self.assertIn("sni-mismatch", [r["reason"] for r in self.filter.records("close")])

    def test_second_hello_without_a_name_or_malformed_is_refused(self):
        cases = {"no-sni": CCS + key_share_hello(None, share=P256),
                 "bad-client-hello": b"\x14\x03\x03\x00\x02\x01\x01" + key_share_hello(b"evil.example.net"),
                 "not-tls": b"GET / HTTP/1.1\r\nHost: evil.example.net\r\n\r\n"}
        for reason, second in cases.items():
            with self.subTest(reason=reason):
                records = len(self.filter.records())
                before = len(self.tls.names_seen())
                answer, after, closed = self.retry(second)
                self.assertIn(HRR_RANDOM, answer)
                self.assertTrue(closed)
                time.sleep(0.2)
                self.assertEqual(self.tls.names_seen()[before:], ["loop.example.com"])
                self.assertEqual([r["reason"] for r in self.filter.records()[records:]],
                                 ["allowed-by-rule", reason])

    def test_second_hello_hidden_in_the_first_record_is_refused(self):
        one = key_share_hello(b"loop.example.com")[5:]
        two = key_share_hello(b"evil.example.net", share=P256)[5:]
        with self.tunnel() as sock:
            sock.sendall(b"\x16\x03\x01" + struct.pack("!H", len(one + two)) + one + two)
            answer, closed = read_until_closed(sock, 10)
        self.assertTrue(closed)
        self.assertEqual(answer, b"")
        self.assertEqual(self.tls.names_seen(), [])
        self.assertEqual(self.reasons(), ["bad-client-hello"])

    def test_second_hello_for_the_same_name_reaches_the_server(self):
        answer, after, closed = self.retry(CCS + key_share_hello(b"loop.example.com", share=P256))
        self.assertIn(HRR_RANDOM, answer)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(self.tls.names_seen()) < 2:
            time.sleep(0.05)
        self.assertEqual(self.tls.names_seen(), ["loop.example.com", "loop.example.com"])
        self.assertNotIn("sni-mismatch", self.reasons())

    def test_real_clients_finish_the_handshake_with_and_without_a_retry(self):
        """Python's ssl client sends only an X25519 key share by default: against this server
        that is a HelloRetryRequest, then a full TLS 1.3 session through the tunnel; with a
        P-256 share there is no retry."""
        for curve in (None, "prime256v1"):
            with self.subTest(curve=curve):
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                if curve:
                    context.set_ecdh_curve(curve)
                retries = self.tls.output().count(HRR_RANDOM[4:].hex().upper())
                with self.tunnel() as sock:
                    with context.wrap_socket(sock, server_hostname="loop.example.com") as tls:
                        self.assertEqual(tls.version(), "TLSv1.3")
                        tls.sendall(b"through the tunnel\n")
                        self.assertEqual(read_until(tls, b"\n", 10), b"lennut eht hguorht\n")
                seen = self.tls.output().count(HRR_RANDOM[4:].hex().upper()) - retries
                self.assertEqual(seen, 0 if curve else 1, "the retry did (not) happen as planned")
        self.assertNotIn("sni-mismatch", self.reasons())
        self.assertNotIn("bad-server-hello", self.reasons())
        closes = self.filter.records("close")
        self.assertTrue(closes and all(r["bytes_up"] > 500 and r["bytes_down"] > 500 for r in closes),
                        closes)


class ServerAnswerTest(ProxyTestCase):
    """Until the server's ServerHello shows there is no HelloRetryRequest, what the client sends
    after its checked ClientHello is held; a server that answers anything else than TLS, or
    nothing, closes the tunnel ("bad-server-hello") and the held bytes never reach it."""

    def open_tunnel(self, server, data):
        proxy = self.proxy(["--allow", f"loop.example.com:{server.port}", "--allow",
                            f"{LOOP}:{server.port}"], handshake_timeout=1.5, hosts=True)
        with connect(proxy.port, 10) as sock:
            sock.sendall(http_connect(b"loop.example.com:%d" % server.port))
            self.assertTrue(granted("http", recv_exactly(sock, 39, 10)))
            sock.sendall(data)
            answer, closed = read_until_closed(sock, 10)
        return proxy, answer, closed

    def test_an_answer_that_is_not_tls_closes_the_tunnel(self):
        server = self.upstream("record", reply=b"HTTP/1.1 200 OK\r\n\r\n", idle=0.3)
        hello = client_hello("loop.example.com")
        proxy, answer, closed = self.open_tunnel(server, hello + b"held until the ServerHello")
        self.assertTrue(closed)
        self.assertEqual(server.next_record(12), hello, "bytes after the hello reached the server")
        self.assertEqual([r["reason"] for r in proxy.records()], ["allowed-by-rule", "bad-server-hello"])
        self.assertEqual(proxy.records("close")[0]["decision"], "deny")
        self.assert_alive(proxy)

    def test_a_silent_server_closes_the_tunnel_in_time(self):
        server = self.upstream("hold")
        started = time.monotonic()
        proxy, answer, closed = self.open_tunnel(server, client_hello("loop.example.com"))
        self.assertTrue(closed)
        self.assertLess(time.monotonic() - started, 9)
        self.assertEqual([r["reason"] for r in proxy.records()], ["allowed-by-rule", "bad-server-hello"])
