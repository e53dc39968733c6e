"""Real clients through socks_filter.py: curl (SOCKS5 on the unix socket, and SOCKS5 / HTTP
CONNECT / absolute-form HTTP through a socat TCP->unix bridge) against a local HTTP server that an
IP rule allows. Denied names fail the way curl reports them, and the JSON log shows both.

Needs curl (>= 7.84, for SOCKS on a unix socket) and socat: skipped when missing, failed under CI=true.
"""

import http.server
import os
import signal
import socket
import subprocess
import threading
import time
import unittest

from tests.proxy_harness import WAIT, ProxyTestCase, free_port, read_log, require_tool

BODY = b"hello through the filter\n"
DENIED_HOST = "denied.example.com"


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with BODY and records the request line and headers it received."""

    def do_GET(self):
        self.server.requests.append((self.requestline, dict(self.headers.items())))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


def clean_env():
    """The environment without proxy variables, so curl uses only the proxy it is told."""
    return {name: value for name, value in os.environ.items()
            if not name.lower().endswith("_proxy")}


class CurlTest(ProxyTestCase):

    def setUp(self):
        super().setUp()
        require_tool(self, "curl")
        self.sock = os.path.join(self.tmp, "proxy.sock")
        self.web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RecordingHandler)
        self.web.daemon_threads = True
        self.web.requests = []
        self.web_port = self.web.server_address[1]
        thread = threading.Thread(target=self.web.serve_forever, kwargs={"poll_interval": 0.1},
                                  daemon=True)
        thread.start()
        self.addCleanup(self.web.server_close)
        self.addCleanup(thread.join, WAIT)
        self.addCleanup(self.web.shutdown)
        self.url = f"http://127.0.0.1:{self.web_port}/page"

    def start_proxy(self, *rules):
        rules = rules or ("--allow", f"127.0.0.1:{self.web_port}")
        self.proxy_log = self.daemon("--listen", self.sock, *rules).log_path

    def start_bridge(self):
        """socat TCP4-LISTEN on a loopback port forwarding to the proxy's unix socket."""
        require_tool(self, "socat")
        port = free_port()
        bridge = subprocess.Popen(
            ["socat", f"TCP4-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"UNIX-CONNECT:{self.sock}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.addCleanup(self.stop_bridge, bridge)
        for _ in range(200):                    # bounded: socat listens within moments
            if bridge.poll() is not None:
                self.fail(f"socat exited with {bridge.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
                break
            except ConnectionRefusedError:
                time.sleep(0.02)
        else:
            self.fail("socat bridge never accepted")
        return port

    @staticmethod
    def stop_bridge(bridge):
        """End socat and the children it forked (they share the session socat leads)."""
        try:
            os.killpg(bridge.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        bridge.wait(WAIT)

    def curl(self, *args):
        """Run curl (no config file, bounded time); return (exit code, stdout, stderr)."""
        result = subprocess.run(["curl", "-q", "-sS", "--max-time", "10", *args],
                                stdin=subprocess.DEVNULL, capture_output=True, env=clean_env(),
                                timeout=WAIT + 5)
        return result.returncode, result.stdout, result.stderr.decode("utf-8", "replace")

    def unix_proxy(self):
        return f"socks5h://localhost{self.sock}"

    def assert_logged(self, proto, host, port, decision, reason=None):
        records = read_log(self.proxy_log, 1, lambda r: r["event"] == "decision" and r["host"] == host
                           and r["proto"] == proto)
        found = [r for r in records if r["event"] == "decision" and r["host"] == host
                 and r["proto"] == proto and r["port"] == port]
        self.assertTrue(found, f"no {proto} decision for {host}:{port} in {records}")
        self.assertEqual(found[-1]["decision"], decision)
        if reason is not None:
            self.assertEqual(found[-1]["reason"], reason)
        return records

    # -- SOCKS5 on the unix socket ----------------------------------------------------------

    def test_socks5h_on_unix_socket(self):
        """curl --proxy socks5h://localhost/ABS/PATH reaches the IP-rule-allowed server."""
        self.start_proxy()
        code, out, err = self.curl("--proxy", self.unix_proxy(), self.url)
        self.assertEqual((code, out), (0, BODY), err)
        self.assertEqual(self.web.requests[0][0], "GET /page HTTP/1.1")

    def test_socks5h_denied_name_exit_97(self):
        """A name no rule allows fails with curl's SOCKS error 97; the log shows deny and allow."""
        self.start_proxy()
        code, out, err = self.curl("--proxy", self.unix_proxy(), f"http://{DENIED_HOST}/")
        self.assertEqual(code, 97, err)
        code, out, err = self.curl("--proxy", self.unix_proxy(), self.url)
        self.assertEqual(code, 0, err)
        self.assert_logged("socks5", DENIED_HOST, 80, "deny", "not-in-allowlist")
        self.assert_logged("socks5", "127.0.0.1", self.web_port, "allow")
        records = read_log(self.proxy_log, 1, lambda r: r["event"] == "close")
        closes = [r for r in records if r["event"] == "close"]
        self.assertEqual([(r["host"], r["port"], r["reason"]) for r in closes],
                         [("127.0.0.1", self.web_port, "closed")])
        self.assertGreater(closes[0]["bytes_down"], len(BODY))
        self.assertEqual(self.web.requests[0][0], "GET /page HTTP/1.1")

    def test_socks5h_unlisted_port_denied(self):
        """The IP rule names one port: the same address on another port is refused (97)."""
        self.start_proxy()
        code, _, err = self.curl("--proxy", self.unix_proxy(), f"http://127.0.0.1:{free_port()}/")
        self.assertEqual(code, 97, err)
        self.assertEqual(self.web.requests, [])

    # -- through a socat TCP->unix bridge ---------------------------------------------------

    def test_socks5h_via_socat_bridge(self):
        """curl with socks5h:// to a socat bridge in front of the unix socket."""
        self.start_proxy()
        port = self.start_bridge()
        code, out, err = self.curl("--proxy", f"socks5h://127.0.0.1:{port}", self.url)
        self.assertEqual((code, out), (0, BODY), err)
        code, _, err = self.curl("--proxy", f"socks5h://127.0.0.1:{port}", f"http://{DENIED_HOST}/")
        self.assertEqual(code, 97, err)

    def test_http_connect_via_socat_bridge(self):
        """curl -p (HTTP CONNECT) through the bridge tunnels to the server; the log says http-connect."""
        self.start_proxy()
        port = self.start_bridge()
        code, out, err = self.curl("-p", "--proxy", f"http://127.0.0.1:{port}", self.url)
        self.assertEqual((code, out), (0, BODY), err)
        self.assertEqual(self.web.requests[0][0], "GET /page HTTP/1.1")
        self.assert_logged("http-connect", "127.0.0.1", self.web_port, "allow")

    def test_http_connect_denied_exit_56(self):
        """A denied CONNECT: curl exits 56 and reports the proxy's 403."""
        self.start_proxy()
        port = self.start_bridge()
        code, _, err = self.curl("-p", "--proxy", f"http://127.0.0.1:{port}", f"http://{DENIED_HOST}/")
        self.assertEqual(code, 56, err)
        self.assertIn("403", err)
        self.assert_logged("http-connect", DENIED_HOST, 80, "deny", "not-in-allowlist")

    def test_http_absolute_form_via_socat_bridge(self):
        """curl without -p sends absolute-form; the server gets origin form without Proxy-Connection."""
        self.start_proxy()
        port = self.start_bridge()
        code, out, err = self.curl("--proxy", f"http://127.0.0.1:{port}", self.url)
        self.assertEqual((code, out), (0, BODY), err)
        request_line, headers = self.web.requests[0]
        self.assertEqual(request_line, "GET /page HTTP/1.1")
        self.assertEqual(headers.get("Host"), f"127.0.0.1:{self.web_port}")
        self.assertNotIn("Proxy-Connection", headers)
        self.assert_logged("http", "127.0.0.1", self.web_port, "allow")

    def test_http_absolute_form_denied_403(self):
        """A denied absolute-form GET: curl exits 0, status 403, the body names host, port and rule."""
        self.start_proxy()
        port = self.start_bridge()
        code, out, err = self.curl("--proxy", f"http://127.0.0.1:{port}", "-w", "\n%{http_code}",
                                   f"http://{DENIED_HOST}/x")
        self.assertEqual(code, 0, err)
        body, _, status = out.decode().rpartition("\n")
        self.assertEqual(status, "403")
        self.assertIn(f"{DENIED_HOST}:80", body)
        self.assertIn(f"allow rule '{DENIED_HOST}:80'", body)
        self.assert_logged("http", DENIED_HOST, 80, "deny", "not-in-allowlist")
        self.assertEqual(self.web.requests, [])

    # -- rules from a file ------------------------------------------------------------------

    def test_allow_file_with_comments_and_blanks(self):
        """--allow-file: comments, blank lines and trailing comments are ignored, the rules apply."""
        rules = os.path.join(self.tmp, "allow.txt")
        with open(rules, "w") as handle:
            handle.write(f"# hosts the test needs\n\n   \n127.0.0.1:{self.web_port}   # the test server\n"
                         "api.example.com:443\n# denied.example.com\n")
        self.start_proxy("--allow-file", rules)
        code, out, err = self.curl("--proxy", self.unix_proxy(), self.url)
        self.assertEqual((code, out), (0, BODY), err)
        code, _, err = self.curl("--proxy", self.unix_proxy(), f"http://{DENIED_HOST}/")
        self.assertEqual(code, 97, err)
        self.assert_logged("socks5", "127.0.0.1", self.web_port, "allow")


if __name__ == "__main__":
    unittest.main()
