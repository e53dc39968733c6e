"""The sandbox side of network filtering, in real sandboxes (real bwrap, socat, curl and
socks_filter.py, a fake CLI, upstreams on the host's loopback only): no route without the
proxy, what the bridge lets through and refuses, allow files, the advisory bridge's
credential, host ports.  Tests with names pinned to loopback run the wrapper under
`unshare -rm` with a private /etc/hosts (test names -> 127.0.0.1, one -> 10.1.2.3, refused
before any connect) and /etc/resolv.conf where nothing answers."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import bw_lib

from tests.sandbox_harness import (ALERT, BODY, BW_CLAUDE, NAME, SSH_BANNER, PinnedCase,
                                   SessionCase, alive, children, command_line, http_server,
                                   loopback, one_line, read_text, tunnel, wait_for)
from tests.proxy_harness import built_client_hello, client_hello


def curl(url, options=""):
    """A curl command line for the sandbox's shell; `options` is shell text."""
    return f"curl -sS -m 10 {options} {url}"


class NetworkSandboxTest(SessionCase):
    """With an upstream on the host's 127.0.0.1."""

    PREFIX = "bw-network-"
    TOOLS = ("socat", "curl")

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.port = http_server(cls.addClassCleanup).server_address[1]

    def test_unshare_net_leaves_no_route(self):
        upstream = f"http://127.0.0.1:{self.port}/"
        direct = "--noproxy '*' --connect-timeout 3"
        script = "; ".join([curl(upstream, direct), "echo loopback=$?",
                            curl("http://192.0.2.1/", direct), "echo remote=$?",
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
            curl(upstream, "--noproxy ''"),
            curl(upstream, "--noproxy '' -x \"$ALL_PROXY\""),
            curl(upstream, "--noproxy '' -p -x \"$HTTPS_PROXY\""),
            curl("http://blocked.example/", "--noproxy '' -o /dev/null -w 'blocked=%{http_code}\\n'"),
            curl(upstream, "--noproxy '*'") + "; echo direct=$?",
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
                                    script=curl(upstream, "--noproxy ''")))
        self.assertIn("advisory", result.stderr)
        self.assertIn(BODY.decode(), result.stdout)
        self.assertIn("1 allowed, 0 blocked", result.stderr)
        self.assert_clean()

    def test_user_allow_file_is_read(self):
        self.write_home(".config/bw-claude/allowed-domains", f"# mine\n127.0.0.1:{self.port}\n")
        result = self.check(self.bw("--filter-network", "--unshare-net", script=curl(
            f"http://127.0.0.1:{self.port}/", "--noproxy ''")))
        self.assertIn(BODY.decode(), result.stdout)


class AllowFileTest(SessionCase):
    """--allow-file from a pipe, and from places the sandbox can write; an upstream on the
    host's 127.0.0.2."""

    PREFIX = "bw-allowfile-"
    TOOLS = ("socat", "curl", "bash")

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.port = http_server(cls.addClassCleanup, "127.0.0.2").server_address[1]

    def curl(self):
        return f"curl -fsS --max-time 20 http://127.0.0.2:{self.port}/"

    def test_a_pipe_from_process_substitution(self):
        # What a user types: bw-claude --allow-file <(echo rule) ...
        command = (f"exec {sys.executable} {BW_CLAUDE} --filter-network --unshare-net "
                   f"--allow-file <(echo '# from a pipe'; echo 127.0.0.2:{self.port}) "
                   f"-- '{self.curl()}'")
        result = subprocess.run(["bash", "-c", command], cwd=self.project, env=self.env,
                                capture_output=True, text=True, timeout=60)
        self.check(result)
        self.assertEqual(result.stdout, BODY.decode())
        self.assert_all_gone()
        # Without the rule the same request is refused: the rule came from the pipe.
        result = self.bw("--filter-network", "--unshare-net", script=self.curl())
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn(BODY.decode(), result.stdout)

    def test_a_bad_rule_in_a_pipe_names_the_pipe(self):
        command = (f"exec {sys.executable} {BW_CLAUDE} --filter-network "
                   "--allow-file <(echo '*') -- 'echo ran'")
        result = subprocess.run(["bash", "-c", command], cwd=self.project, env=self.env,
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertTrue(one_line(result.stderr), result.stderr)
        self.assertRegex(result.stderr, r"bad allow rule: /dev/fd/\d+:1:")
        self.assertNotIn("ran", result.stdout)

    def test_files_the_sandbox_can_write_are_refused(self):
        # A session (this one, or an earlier one) could have written these: a rule there is
        # the agent's, not the user's.  The CLI's state is the host's own only with
        # --allow-config-writes (otherwise the sandbox gets a copy).  The host-side effect checked: the session does not
        # start, so no rule of the agent's ever reaches the proxy.
        outside = self.write_home("rules/allow", f"127.0.0.2:{self.port}\n")
        in_project = os.path.join(self.project, "allow")
        shutil.copy(outside, in_project)
        link_in_project = os.path.join(self.project, "link")
        os.symlink(outside, link_in_project)
        link_outside = os.path.join(self.root, "link-to-project")
        os.symlink(in_project, link_outside)
        state = self.write_home(".claude/allow", f"127.0.0.2:{self.port}\n")
        extra = os.path.join(self.root, "extra")
        os.makedirs(extra)
        in_extra = os.path.join(extra, "allow")
        shutil.copy(outside, in_extra)
        for path, argv in ((in_project, ()), (link_in_project, ()), (link_outside, ()),
                           (state, ("--allow-config-writes",)), (in_extra, ("--allow-rw", extra))):
            with self.subTest(path=path):
                result = self.bw("--filter-network", "--unshare-net", *argv, "--allow-file",
                                 path, script=self.curl())
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertTrue(one_line(result.stderr), result.stderr)
                self.assertIn("which the sandbox can write", result.stderr)
                self.assertNotIn(BODY.decode(), result.stdout)
                self.assertFalse(os.path.exists(os.path.join(self.project, ".fake-cli-args")))
        # The same rules from the user's own place work.
        self.assertEqual(self.check(self.bw("--filter-network", "--unshare-net", "--allow-file",
                                            outside, script=self.curl())).stdout, BODY.decode())
        self.assert_all_gone()


class BridgeTest(PinnedCase):
    def test_default_rules_are_for_port_443(self):
        """CONNECT claude.ai:8443 or :80 is not the profile's claude.ai: refused before any
        lookup, and nothing listening on the host's loopback at that port is reached."""
        script = "; ".join(
            f"curl -sS -m 8 -o /dev/null -w '{host}:{port}=%{{http_connect}}\\n' -p -x \"$HTTPS_PROXY\" "
            f"telnet://{host}:{port} </dev/null" for host, port in
            (("claude.ai", 8443), ("claude.ai", 80), ("api.anthropic.com", 2053)))
        result = self.filtered("--filter-network", script=script)
        self.assertEqual(re.findall(r"=(\d+)", result.stdout), ["403"] * 3, result.stderr)
        self.assertEqual({(r["host"], r["port"], r["reason"]) for r in self.decisions()},
                         {("claude.ai", 8443, "not-in-allowlist"), ("claude.ai", 80, "not-in-allowlist"),
                          ("api.anthropic.com", 2053, "not-in-allowlist")})

    def test_a_name_tunnel_on_any_port_must_open_with_its_client_hello(self):
        server = self.upstream()
        cases = {"alert": ALERT + client_hello("attacker.example"),
                 "ccs": b"\x14\x03\x03\x00\x01\x01" + client_hello("attacker.example"),
                 "heartbeat": b"\x18\x03\x03\x00\x03\x01\x00\x00" + client_hello("attacker.example"),
                 "nosni": built_client_hello(None), "plain": b"GET / HTTP/1.1\r\nHost: attacker.example\r\n\r\n",
                 # built: no 0xff byte, which curl's telnet:// would double
                 "other": built_client_hello(b"attacker.example"),
                 "good": built_client_hello(NAME.encode(), pieces=3)}
        for name, data in cases.items():
            self.put(name, data)
        script = "; ".join(tunnel(name, NAME, server.port) for name in cases)
        self.filtered("--filter-network", *loopback(server), "--allow-domain", f"{NAME}:{server.port}",
                script=script)
        reasons = [r["reason"] for r in self.decisions()]
        self.assertEqual(reasons, ["tls-alert-first", "tls-change-cipher-spec-first",
                                   "tls-heartbeat-first", "no-sni", "not-tls", "sni-mismatch",
                                   "allowed-by-rule"])
        # on the host: only the good hello ever reached the upstream, intact (the proxy
        # connects before it sees the first bytes; the refused ones never sent any)
        self.assertTrue(wait_for(lambda: len(server.received) == 7))
        self.assertEqual([r for r in server.received if r], [cases["good"]])

    def test_a_raw_rule_carries_ssh_like_traffic_and_its_absence_does_not(self):
        server = self.upstream("ssh")
        self.put("hello", b"SSH-2.0-OpenSSH_9.2\r\n")
        script = "; ".join([tunnel("hello", NAME, server.port),
                            tunnel("hello", NAME, server.port, via="$ALL_PROXY")])
        banner = SSH_BANNER.hex()
        raw = self.filtered("--filter-network", *loopback(server), "--allow-domain",
                      f"{NAME}:{server.port}/raw", script=script)
        self.assertEqual(raw.stdout.count(banner), 2, raw.stdout + raw.stderr)
        self.assertTrue(wait_for(lambda: len(server.received) == 2))
        self.assertEqual(server.received, [b"SSH-2.0-OpenSSH_9.2\r\n"] * 2)
        server.received.clear()
        self.assertEqual({r.get("tunnel") for r in self.decisions()}, {"raw"})
        os.unlink(self.log)
        plain = self.filtered("--filter-network", *loopback(server), "--allow-domain",
                        f"{NAME}:{server.port}", script=script)
        self.assertNotIn(banner, plain.stdout)
        self.assertEqual([r["reason"] for r in self.decisions()], ["not-tls"] * 2)
        self.assertTrue(wait_for(lambda: len(server.received) == 2))
        self.assertEqual(server.received, [b""] * 2, "the upstream got bytes without a raw rule")
        self.assertIn(f"--allow-domain {NAME}:{server.port}/raw", self.summary(plain))

    def test_plain_http_through_the_http_proxy_needs_only_the_name_rule(self):
        """Absolute-form GET http://name:port/ keeps its Host check and needs no /raw rule."""
        server = self.upstream("http")
        url = f"http://{NAME}:{server.port}/"
        script = (f"curl -sS -m 8 --noproxy '' -x \"$HTTP_PROXY\" {url}; "
                  f"curl -sS -m 8 --noproxy '' -x \"$HTTP_PROXY\" -H 'Host: attacker.example' {url}")
        result = self.filtered("--filter-network", *loopback(server), "--allow-domain",
                         f"{NAME}:{server.port}", script=script)
        self.assertEqual(result.stdout.count("ok"), 1, result.stdout + result.stderr)
        self.assertIn("Host header does not match", result.stdout)
        self.assertTrue(wait_for(lambda: len(server.received) == 1))
        self.assertIn(f"Host: {NAME}:{server.port}".encode(), server.received[0])

    def test_filter_network_alone_leaves_only_lo(self):
        server = self.upstream("http")
        script = ("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; "
                  f"curl -sS -m 5 --noproxy '*' http://127.0.0.1:{server.port}/; echo direct=$?")
        result = self.filtered("--filter-network", "--allow-domain", "127.0.0.1:8001", script=script,
                         pinned=False)
        self.assertEqual(result.stdout.split()[0], "lo")
        hints = [line for line in result.stderr.splitlines() if "hint:" in line]
        self.assertEqual(len(hints), 1, result.stderr)
        self.assertIn("--host-port 8001", hints[0])
        self.assertNotIn("eth", result.stdout)
        self.assertIn("direct=7", result.stdout)
        self.assertNotIn("advisory", result.stderr)
        self.assertEqual(server.accepted, 0, "a direct connection reached the host's loopback")

    def test_host_port_reaches_a_host_service_bound_to_127_0_0_1(self):
        server = self.upstream("http")
        script = ("curl -sS -m 8 --noproxy '*' http://127.0.0.1:8123/ ; "
                  "curl -sS -m 8 --noproxy '*' http://localhost:8123/x")
        result = self.filtered("--filter-network", "--host-port", f"8123:{server.port}", script=script,
                         pinned=False)
        self.assertEqual(result.stdout.count("ok"), 2, result.stderr)
        self.assertTrue(wait_for(lambda: len(server.received) == 2))
        self.assertTrue(all(r.startswith(b"GET /") for r in server.received), server.received)
        decided = [(r["host"], r["port"], r["decision"]) for r in self.decisions()]
        self.assertEqual(decided, [("127.0.0.1", server.port, "allow")] * 2)
        self.assertIn("2 allowed, 0 blocked", self.summary(result))


class AdvisoryBridgeTest(PinnedCase):
    def other_user(self, argv):
        """Run argv as another local user: nobody when we are root, else (an unprivileged
        run, which cannot switch users) as ourselves but without the session's credential."""
        if os.geteuid() == 0 and shutil.which("setpriv"):
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd="/")

    def test_another_user_cannot_use_the_bridge(self):
        server = self.upstream("http")
        rule = f"127.0.0.1:{server.port}"
        url = f"http://{rule}/"
        script = (f'printf "%s\\n" "${{HTTPS_PROXY##*@}}" > bridge.txt; '
                  f'curl -sS -m 8 --noproxy "" {url} > mine.txt; i=0; '
                  'while [ ! -e done ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done')
        session = self.popen("--no-defaults", "--filter-network", "--share-net", "--allow-domain",
                             rule, "--proxy-log", self.log, "--shell", "--", "-c", script)
        try:
            bridge_file = os.path.join(self.project, "bridge.txt")
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.project, "mine.txt"))
                                 and os.path.getsize(os.path.join(self.project, "mine.txt")) > 0, 30))
            with open(bridge_file) as f:
                bridge = f.read().strip()
            self.assertRegex(bridge, r"^127\.0\.0\.1:\d+$")
            before = server.accepted
            tries = {
                "http": ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                         "--noproxy", "", "-x", f"http://{bridge}", url],
                "http-guess": ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                               "--noproxy", "", "-x", f"http://bw:guess@{bridge}", url],
                "socks5": ["curl", "-sS", "-m", "5", "--noproxy", "", "-x", f"socks5h://{bridge}", url],
                "socks4a": ["curl", "-sS", "-m", "5", "--noproxy", "", "-x", f"socks4a://{bridge}", url],
            }
            seen = {name: self.other_user(argv) for name, argv in tries.items()}
        finally:
            with open(os.path.join(self.project, "done"), "w"):
                pass
            out, err = session.communicate(timeout=60)
        self.assertEqual(session.returncode, 0, err)
        with open(os.path.join(self.project, "mine.txt")) as f:
            self.assertEqual(f.read(), "ok\n", "the session's own client did not get through")
        self.assertEqual(seen["http"].stdout, "407")
        self.assertEqual(seen["http-guess"].stdout, "407")
        for name in ("socks5", "socks4a"):
            self.assertNotEqual(seen[name].returncode, 0, seen[name])
            self.assertNotIn("ok", seen[name].stdout)
        # on the host: the other user's requests never reached the service
        self.assertEqual(server.accepted, before)
        reasons = [r["reason"] for r in self.decisions()]
        self.assertEqual(reasons.count("proxy-auth"), 4, reasons)
        self.assertIn("advisory", err)
        summary = [line for line in err.splitlines() if "network:" in line][-1]
        self.assertIn("1 allowed, 0 blocked", summary)
        self.assertIn("4 connections without this session's proxy credential refused", summary)

    def test_dry_run_shows_no_token(self):
        """Each run has a fresh random token: two dry runs printing the same shows none."""
        runs = [self.bw("--no-defaults", "--filter-network", "--share-net", "--shell", "--dry-run",
                        timeout=30) for _ in range(2)]
        self.assertEqual(runs[0].returncode, 0, runs[0].stderr)
        self.assertIn("--token-env BW_PROXY_TOKEN", runs[0].stdout)
        self.assertIn("BW_PROXY_TOKEN=<hidden>", runs[0].stdout)
        self.assertEqual(runs[0].stdout, runs[1].stdout)


BLOCKED = ("curl -sS -m 5 --noproxy '' -o /dev/null -w '%{http_code}' -x \"$HTTPS_PROXY\" "
           "http://blocked.example/")      # refused by the proxy before any lookup: 403


class ProxyLifeTest(SessionCase):
    """bwrap starts without waiting for the proxy: the wrapper binds the proxy's socket and
    hands it over.  The CLI still starts only once the bridge listens (its connections wait
    for the proxy); a proxy that fails to start ends the session; one that dies takes its
    socket along, so the sandbox has no network, never an open one."""

    PREFIX = "bw-proxy-life-"
    TOOLS = ("socat", "curl")

    def test_the_cli_starts_only_once_the_bridge_listens(self):
        for _ in range(3):
            result = self.shell(f'echo "first=$({BLOCKED})"', "--no-defaults", "--filter-network",
                                code=0)
            self.assertIn("first=403", result.stdout, result.stderr)
            self.assertIn("0 allowed, 1 blocked", result.stderr)
        self.assert_clean()

    def test_a_proxy_that_fails_to_start_ends_the_session(self):
        log = os.path.join(self.root, "no-such-directory", "proxy.jsonl")
        script = f'echo "first=$({BLOCKED})"; sleep 30; echo ran'
        started = time.monotonic()
        result = self.shell(script, "--no-defaults", "--filter-network", "--proxy-log", log)
        self.assertLess(time.monotonic() - started, 25, "the session was not ended")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("ran", result.stdout)
        self.assertNotIn("first=403", result.stdout)    # nothing answered, let alone let through
        self.assertIn("the filtering proxy did not start", result.stderr)
        self.assertIn("cannot open the log", result.stderr)
        self.assert_clean()

    def slow_proxy(self):
        """An allow file the proxy takes about a second to read (argparse is quadratic in
        the number of options; the wrapper reads the file in ~30 ms before bwrap): the
        sandbox is up well before the proxy serves."""
        path = os.path.join(self.root, "many-rules")
        with open(path, "w") as f:
            f.writelines(f"h{i}.example.com:443\n" for i in range(7000))
        return ["--no-defaults", "--filter-network", "--allow-file", path]

    def test_a_session_that_ends_before_the_proxy_serves_still_says_its_summary(self):
        result = self.shell("echo first", *self.slow_proxy(), code=0)
        self.assertIn("first", result.stdout)
        self.assertIn("0 allowed, 0 blocked", result.stderr)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with self.subTest(signal=sig):
                marker = os.path.join(self.project, "up")
                session = self.popen(*self.slow_proxy(), "--shell", "--", "-c",
                                     ": > up; sleep 60")
                try:
                    self.assertTrue(wait_for(lambda: os.path.exists(marker), 30))
                    session.send_signal(sig)
                finally:
                    out, err = session.communicate(timeout=60)
                os.remove(marker)
                self.assertEqual(session.returncode, 128 + sig, err)
                self.assertIn("0 allowed, 0 blocked", err)
                self.assert_clean()

    def test_a_short_session_does_not_wait_for_the_proxy_but_learn_does(self):
        # A session over before the proxy served says so and stops it (nothing went out);
        # with --learn the proxy's start is awaited, so the file is written as always.
        result = self.shell("echo first", *self.slow_proxy(), code=0)
        self.assertIn("the session ended before the proxy served", result.stderr)
        self.assert_clean()
        learned = os.path.join(self.root, "learned")
        result = self.shell("echo second", "--no-defaults", "--learn", learned, code=0)
        self.assertNotIn("the session ended before the proxy served", result.stderr)
        self.assertTrue(os.path.isfile(learned), result.stderr)
        self.assert_clean()

    def test_a_session_that_runs_on_gets_its_proxy_without_a_connection(self):
        # The proxy does its start when a connection waits, or once the session has run
        # PROXY_HAND_SECONDS: a session that long finds it serving, and its summary is the
        # proxy's own, not "ended before the proxy served".
        result = self.shell(f"sleep {bw_lib.PROXY_HAND_SECONDS * 10}", "--no-defaults",
                            "--filter-network", code=0)
        self.assertIn("bw-claude: network: 0 allowed, 0 blocked\n", result.stderr)
        self.assertNotIn("the session ended before the proxy served", result.stderr)
        self.assert_clean()

    def test_the_proxy_reads_its_code_only_once_handed_its_arguments(self):
        """Until FilterProxy.hand, the proxy's interpreter only waits: its start (importing
        socks_filter, ~40 ms of CPU) would compete with the sandbox's own.  /proc/PID/io
        counts what it read: socks_filter's code comes after the arguments."""
        private = tempfile.mkdtemp(dir=self.root)
        path, err = os.path.join(private, "proxy.sock"), os.path.join(private, "proxy.err")
        early = bw_lib.ProxyInterpreter(dict(os.environ))
        self.addCleanup(early.stop)

        def bytes_read():
            with open(f"/proc/{early.process.pid}/io") as f:
                return int(next(line for line in f if line.startswith("rchar:")).split()[1])

        listener = bw_lib.proxy_listener(path)
        waits = ("select", "poll")     # the kernel's name for where it sleeps: select()
        self.assertTrue(wait_for(lambda: any(word in read_text(
            f"/proc/{early.process.pid}/wchan") for word in waits), 20))
        first = bytes_read()            # Python's own start read (3.10 reads ~150 KB)
        time.sleep(0.3)
        self.assertLess(bytes_read() - first, 10000)
        before = bytes_read()
        early.hand(["--listen", path, "--listen-fd", str(bw_lib.HANDED_LISTENER),
                    "--log", os.path.join(private, "proxy.jsonl"),
                    "--ready-fd", str(early.ready_number)], err, listener.fileno())
        listener.close()
        self.assertEqual(bw_lib.read_until(early.ready_fd, 20, b"\n").decode().strip(),
                         "ready " + path)
        with open(bw_lib.FILTER_SCRIPT, "rb") as f:
            code = len(f.read())
        self.assertGreater(bytes_read() - before, code // 4,
                           "socks_filter was read before its arguments came")

    def test_a_wrapper_killed_before_or_right_after_the_hand_leaves_no_proxy(self):
        """A wrapper killed while the proxy's interpreter waits for its arguments (the end
        of its stdin) leaves no proxy behind; nor does one that hands them and exits at once
        (its parent gone before main() asks the kernel to end it with its parent: the
        interpreter noted its parent's pid before it waited).  Without --ready-fd here, so
        that a broken ready pipe cannot be what ends it."""
        for hand in (False, True):
            with self.subTest(hand=hand):
                private = tempfile.mkdtemp(dir=self.root)
                path = os.path.join(private, "proxy.sock")
                wrapper = subprocess.Popen([sys.executable, "-c", (
                    "import os, sys; sys.path.insert(0, sys.argv[1]); import bw_lib\n"
                    "early = bw_lib.ProxyInterpreter(dict(os.environ))\n"
                    "print(early.process.pid, flush=True)\n"
                    "if sys.argv[2] == '1':\n"
                    "    import time; time.sleep(0.5)\n"
                    "    listener = bw_lib.proxy_listener(sys.argv[3])\n"
                    "    early.hand(['--listen', sys.argv[3], '--listen-fd', '0', '--log',\n"
                    "                sys.argv[3] + '.log'], sys.argv[3] + '.err',\n"
                    "               listener.fileno())\n"
                    "    os._exit(0)\n"
                    "os.kill(os.getpid(), 9)\n"), os.path.dirname(bw_lib.__file__),
                    "1" if hand else "0", path], stdout=subprocess.PIPE, text=True)
                proxy = int(wrapper.stdout.readline())
                wrapper.communicate(timeout=30)

                self.assertTrue(wait_for(lambda: not alive(proxy), 20),
                                f"the proxy {proxy} outlived its wrapper")
                if hand:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late:
                        with self.assertRaises((ConnectionRefusedError, FileNotFoundError)):
                            late.connect(path)

    def test_a_handed_socket_dies_with_a_proxy_that_fails(self):
        """A connection waiting in the backlog of the socket the wrapper bound and handed
        over is dropped when the proxy fails, and the next one is refused."""
        for failing in (False, True):
            with self.subTest(failing=failing):
                private = tempfile.mkdtemp(dir=self.root)
                path, err = os.path.join(private, "proxy.sock"), os.path.join(private, "proxy.err")
                early = bw_lib.ProxyInterpreter(dict(os.environ))
                self.addCleanup(early.stop)
                listener = bw_lib.proxy_listener(path)
                self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
                waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.addCleanup(waiting.close)
                waiting.settimeout(20)
                waiting.connect(path)
                waiting.sendall(b"\x05\x01\x00")      # a SOCKS5 greeting
                log = os.path.join(private, "no-such-directory" if failing else "", "proxy.jsonl")
                early.hand(["--listen", path, "--listen-fd", str(bw_lib.HANDED_LISTENER),
                            "--log", log, "--ready-fd", str(early.ready_number)],
                           err, listener.fileno())
                listener.close()
                line = bw_lib.read_until(early.ready_fd, 20, b"\n").decode().strip()
                if not failing:
                    self.assertEqual(line, "ready " + path)
                    self.assertEqual(waiting.recv(2), b"\x05\x00")
                    early.stop()
                else:
                    self.assertEqual(line, "")
                    self.assertTrue(wait_for(lambda: early.process.poll() is not None))
                    self.assertEqual(early.process.returncode, 2)
                    self.assertIn("cannot open the log", read_text(err))
                    try:
                        self.assertEqual(waiting.recv(2), b"")
                    except ConnectionResetError:
                        pass
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late:
                    with self.assertRaises(ConnectionRefusedError):
                        late.connect(path)

    def test_arguments_cut_short_are_refused(self):
        """A rule cut short is another rule (api.example.com -> api.example.co): the proxy
        takes its arguments only whole, each ended by a NUL as hand() sends them."""
        private = tempfile.mkdtemp(dir=self.root)
        path, err = os.path.join(private, "proxy.sock"), os.path.join(private, "proxy.err")
        early = bw_lib.ProxyInterpreter(dict(os.environ))
        self.addCleanup(early.stop)
        early.stdin.sendall(b"\0".join(os.fsencode(item) for item in (
            err, "--listen", path, "--ready-fd", str(early.ready_number),
            "--allow", "api.example.com:443")))
        early.stdin.close()
        self.assertEqual(bw_lib.read_until(early.ready_fd, 20, b"\n").decode().strip(), "")
        self.assertTrue(wait_for(lambda: early.process.poll() is not None))
        self.assertEqual(early.process.returncode, 2)
        self.assertFalse(os.path.lexists(path), "it listened")

    def test_a_proxy_that_dies_leaves_the_sandbox_without_network(self):
        script = (f'echo "before=$({BLOCKED})"; : > proxy-answered; i=0; '
                  'while [ ! -e proxy-killed ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; '
                  f'echo "after=$({BLOCKED})"')
        session = self.popen("--no-defaults", "--filter-network", "--shell", "--", "-c", script)
        try:
            self.assertTrue(wait_for(lambda: os.path.exists(
                os.path.join(self.project, "proxy-answered")), 30), "the session never got going")
            proxies = [pid for pid in children(session.pid) if "socks_filter" in command_line(pid)]
            self.assertEqual(len(proxies), 1, proxies)
            os.kill(proxies[0], signal.SIGKILL)
        finally:
            with open(os.path.join(self.project, "proxy-killed"), "w"):
                pass
            out, err = session.communicate(timeout=60)
        self.assertEqual(session.returncode, 0, err)
        self.assertIn("before=403", out)
        self.assertIn("after=000", out)
        self.assertIn("the proxy exited with status -9", err)
        self.assert_clean()


if __name__ == "__main__":
    unittest.main()
