"""The tools agents really run, inside the sandbox (issue 13): the real npm, pip and git
against a registry, an index and a repository on the host's loopback (127.0.0.2, reached
through --filter-network --unshare-net and an IP rule) with host caches that must stay
untouched; Node's own fetch; the terminal after SIGTERM, under a real pty; misspelt
options; --allow-file from a pipe and from places the sandbox can write; the session's
home on disk and what is left after exit and after kill -9; the README's claims."""

import base64
import contextlib
import hashlib
import http.server
import io
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import termios
import threading
import time
import unittest
import zipfile

import bw_lib
from bw_lib import PROFILES, Failure
from tests.test_sandbox import (BODY, BW_CLAUDE, FAKE_CLI, REPO, SessionCase, make_session_dirs,
                                missing, one_line, require_sandbox, wait_for)

CLAUDE, GEMINI = PROFILES["claude"], PROFILES["gemini"]
SYSTEM_PYTHON = "/usr/bin/python3"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main",
       "-c", "protocol.file.allow=always"]


# -- what the local registry, index and repository serve -------------------------------------

def npm_tarball():
    """A package tarball as npm publishes one: package/package.json and package/index.js."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, text in (("package/package.json",
                            '{"name": "tiny-pkg", "version": "1.0.0", "main": "index.js"}\n'),
                           ("package/index.js", "module.exports = 'tiny-pkg works';\n")):
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(raw), 0o644
            tar.addfile(info, io.BytesIO(raw))
    return data.getvalue()


def npm_document(base, tarball):
    """The registry's package document (what GET /tiny-pkg returns)."""
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    version = {"name": "tiny-pkg", "version": "1.0.0",
               "dist": {"tarball": f"{base}/tiny-pkg/-/tiny-pkg-1.0.0.tgz",
                        "shasum": hashlib.sha1(tarball).hexdigest(), "integrity": integrity}}
    return json.dumps({"name": "tiny-pkg", "dist-tags": {"latest": "1.0.0"},
                       "versions": {"1.0.0": version}}).encode()


def wheel():
    """A pure-Python wheel, tiny_wheel 1.0, with its RECORD."""
    files = {"tiny_wheel/__init__.py": b"VALUE = 'tiny-wheel works'\n",
             "tiny_wheel-1.0.dist-info/METADATA":
                 b"Metadata-Version: 2.1\nName: tiny-wheel\nVersion: 1.0\n",
             "tiny_wheel-1.0.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = ""
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{name},sha256={digest},{len(data)}\n"
    record += "tiny_wheel-1.0.dist-info/RECORD,,\n"
    files["tiny_wheel-1.0.dist-info/RECORD"] = record.encode()
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return data.getvalue()


class Served(http.server.SimpleHTTPRequestHandler):
    """Static files from `directory`, and JSON documents by path (an npm package document
    is /NAME, while /NAME/-/ holds its tarball: a file cannot be both)."""
    documents = {}

    def do_GET(self):
        document = self.documents.get(self.path.split("?")[0])
        if document is None:
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(document)))
        self.end_headers()
        self.wfile.write(document)

    def log_message(self, *args):
        pass


def serve(directory):
    """A threaded HTTP server on 127.0.0.2 (a host loopback address the sandbox reaches only
    through the proxy and an IP rule): (server, base URL, its documents)."""
    documents = {}
    handler = type("Handler", (Served,), {"documents": documents})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.2", 0), lambda *a, **k: handler(*a, directory=directory, **k))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.2:{server.server_address[1]}", documents


def snapshot(root):
    """Every path below `root` with its type and content, to tell whether anything changed."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            content = None
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
            found[os.path.relpath(path, root)] = (
                stat.S_IFMT(info.st_mode), content,
                None if stat.S_ISDIR(info.st_mode) else info.st_mtime_ns)
    return found


class ToolsCase(SessionCase):
    """Session directories, a fake CLI, a host HOME with caches of its own."""

    def setUp(self):
        make_session_dirs(self, "bw-tools-")
        path = os.path.join(self.bin, "claude")
        with open(path, "w") as f:
            f.write(FAKE_CLI)
        os.chmod(path, 0o755)
        self.env = {"HOME": self.home, "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
                    "LANG": "C.UTF-8", "XDG_RUNTIME_DIR": self.runtime}
        self.base = os.path.join(self.home, ".cache", "bw-claude")

    def write_home(self, relative, text):
        path = os.path.join(self.home, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return path

    def assert_all_gone(self):
        """No session directory is left: neither the socket's nor the home's."""
        self.assert_clean()
        self.assertEqual(os.listdir(self.base) if os.path.isdir(self.base) else [], [])


# -- 1. package managers ----------------------------------------------------------------------

class PackageManagersTest(ToolsCase, unittest.TestCase):
    """npm install, pip install and git clone from loopback, with host caches present."""

    @classmethod
    def setUpClass(cls):
        require_sandbox("socat", "npm", "node", "git")
        cls.served = tempfile.mkdtemp(prefix="bw-served-")
        cls.server, cls.url, documents = serve(cls.served)
        tarball = npm_tarball()
        os.makedirs(os.path.join(cls.served, "tiny-pkg", "-"))
        with open(os.path.join(cls.served, "tiny-pkg", "-", "tiny-pkg-1.0.0.tgz"), "wb") as f:
            f.write(tarball)
        documents["/tiny-pkg"] = npm_document(cls.url, tarball)
        index = os.path.join(cls.served, "simple", "tiny-wheel")
        os.makedirs(index)
        data = wheel()
        name = "tiny_wheel-1.0-py3-none-any.whl"
        with open(os.path.join(cls.served, name), "wb") as f:
            f.write(data)
        with open(os.path.join(index, "index.html"), "w") as f:
            f.write(f'<html><body><a href="/{name}#sha256='
                    f'{hashlib.sha256(data).hexdigest()}">{name}</a></body></html>\n')

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()
        shutil.rmtree(cls.served, True)

    def setUp(self):
        super().setUp()
        # The host's own caches, which the sandbox must neither need nor write.
        self.write_home(".npm/_cacache/index-v5/host-entry", "the host's npm cache\n")
        self.write_home(".cache/pip/http/host-entry", "the host's pip cache\n")
        self.write_home(".cargo/registry/host-entry", "the host's cargo registry\n")
        self.before = snapshot(self.home)

    def in_sandbox(self, script, *argv):
        port = self.server.server_address[1]
        return self.bw("--filter-network", "--unshare-net", "--allow-domain", f"127.0.0.2:{port}",
                       "--env", "npm_config_update_notifier=false", *argv, script=script)

    def assert_host_caches_untouched(self):
        after = snapshot(self.home)
        # What changed is the session base, and the CLI's state directory made for it.
        self.assertEqual({k: v for k, v in after.items() if not k.startswith(
            (".cache/bw-claude", ".claude"))}, self.before)
        self.assert_all_gone()

    def test_npm_install_uses_a_cache_of_the_session(self):
        result = self.check(self.in_sandbox(
            f"npm install --no-audit --no-fund --registry {self.url}/ tiny-pkg >npm.out 2>&1 "
            "|| { cat npm.out; exit 1; }; node -e 'console.log(require(\"tiny-pkg\"))'; "
            "ls ~/.npm 2>&1; echo cache=$npm_config_cache; ls $npm_config_cache"))
        self.assertIn("tiny-pkg works", result.stdout)
        self.assertIn("cache=/var/cache/bw/npm", result.stdout)
        self.assertIn("_cacache", result.stdout.split())
        self.assertIn("No such file", result.stdout, "the host's ~/.npm is not shown")
        self.assertTrue(os.path.isfile(os.path.join(self.project, "node_modules", "tiny-pkg",
                                                    "index.js")))
        self.assert_host_caches_untouched()

    def test_pip_install_uses_a_cache_of_the_session(self):
        if not os.path.exists(SYSTEM_PYTHON) or subprocess.run(
                [SYSTEM_PYTHON, "-m", "pip", "--version"], capture_output=True).returncode:
            missing("pip for the system python3 is needed: apt-get install python3-pip")
        result = self.check(self.in_sandbox(
            f"{SYSTEM_PYTHON} -m pip install --no-input --disable-pip-version-check "
            f"--index-url {self.url}/simple/ --target site tiny-wheel >pip.out 2>&1 "
            "|| { cat pip.out; exit 1; }; "
            f"PYTHONPATH=site {SYSTEM_PYTHON} -c 'import tiny_wheel; print(tiny_wheel.VALUE)'; "
            f"{SYSTEM_PYTHON} -m pip cache dir"))
        self.assertEqual(result.stdout.split(), ["tiny-wheel", "works", "/var/cache/bw/pip"])
        self.assertTrue(os.path.isfile(os.path.join(self.project, "site", "tiny_wheel",
                                                    "__init__.py")))
        self.assert_host_caches_untouched()

    def test_git_clone_over_http(self):
        source = os.path.join(self.root, "source")
        subprocess.run([*GIT, "init", "-q", source], check=True)
        with open(os.path.join(source, "README"), "w") as f:
            f.write("cloned through the proxy\n")
        subprocess.run([*GIT, "-C", source, "add", "README"], check=True)
        subprocess.run([*GIT, "-C", source, "commit", "-qm", "one"], check=True)
        bare = os.path.join(self.served, "repo.git")
        self.addCleanup(shutil.rmtree, bare, True)
        subprocess.run([*GIT, "clone", "-q", "--bare", source, bare], check=True)
        subprocess.run(["git", "-C", bare, "update-server-info"], check=True)
        result = self.check(self.in_sandbox(
            f"git clone -q {self.url}/repo.git cloned && cat cloned/README"))
        self.assertIn("cloned through the proxy", result.stdout)
        self.assert_host_caches_untouched()

    def test_cache_variables_point_into_the_session(self):
        result = self.check(self.bw(script="env"))
        env = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        for name, _ in bw_lib.CACHE_ENV:
            self.assertTrue(env.get(name, "").startswith(bw_lib.SANDBOX_CACHE), name)
        # --env wins over them.
        result = self.check(self.bw("--env", "PIP_CACHE_DIR=/tmp/mine",
                                    script="echo $PIP_CACHE_DIR"))
        self.assertEqual(result.stdout.strip(), "/tmp/mine")
        self.assertNotIn(".npm", bw_lib.HOME_TOOLS)


# -- 2. Node's own fetch --------------------------------------------------------------------

class NodeFetchTest(ToolsCase, unittest.TestCase):
    def test_versions(self):
        self.assertEqual(bw_lib.node_version("v20.20.2\n"), (20, 20))
        self.assertIsNone(bw_lib.node_version("node: not found"))
        cases = {(20, 20): (False, False), (22, 20): (False, False), (22, 21): (True, True),
                 (23, 11): (False, False), (24, 0): (True, False), (24, 5): (True, True),
                 (25, 0): (True, True)}
        for version, (fetch, http) in cases.items():
            with self.subTest(version=version):
                self.assertEqual(bw_lib.node_honours(version, bw_lib.NODE_FETCH_PROXY), fetch)
                self.assertEqual(bw_lib.node_honours(version, bw_lib.NODE_HTTP_PROXY), http)

    def test_fetch_inside_and_what_doctor_says(self):
        require_sandbox("socat", "node")
        server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Upstream200)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        port = server.server_address[1]
        node = shutil.which("node", path=self.env["PATH"])
        version = bw_lib.node_version(subprocess.run([node, "--version"], capture_output=True,
                                                     text=True).stdout)
        script = (f"echo NODE_USE_ENV_PROXY=$NODE_USE_ENV_PROXY; node -e \"fetch('http://127.0.0.2:"
                  f"{port}/').then(r => r.text()).then(t => console.log('fetched', t.trim()), "
                  "e => console.log('failed', e.cause && e.cause.code))\"")
        result = self.check(self.bw("--filter-network", "--unshare-net", "--allow-domain",
                                    f"127.0.0.2:{port}", script=script))
        self.assertIn("NODE_USE_ENV_PROXY=1", result.stdout)
        if bw_lib.node_honours(version, bw_lib.NODE_FETCH_PROXY):
            self.assertIn("fetched " + BODY.decode().strip(), result.stdout)
        else:
            self.assertIn("failed", result.stdout)
        doctor = self.bw("--doctor")
        line = next((l for l in doctor.stdout.splitlines() if "node fetch" in l), "")
        self.assertIn(f"Node v{version[0]}.{version[1]}", line)
        if bw_lib.node_honours(version, bw_lib.NODE_FETCH_PROXY):
            self.assertIn("ok", line)
        else:
            self.assertIn("note", line)
            self.assertIn("ignores proxy variables", line)
        self.assert_all_gone()


class Upstream200(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


# -- 3. the terminal after SIGTERM ---------------------------------------------------------

class TerminalTest(ToolsCase, unittest.TestCase):
    def test_sigterm_restores_the_terminal_the_cli_made_raw(self):
        require_sandbox()
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        modes = termios.tcgetattr(slave)
        modes[0] |= termios.ICRNL
        modes[3] |= termios.ECHO | termios.ICANON | termios.ISIG
        termios.tcsetattr(slave, termios.TCSANOW, modes)
        before = termios.tcgetattr(slave)
        process = subprocess.Popen(
            [sys.executable, BW_CLAUDE, "--shell", "--", "-c",
             "stty raw -echo; echo READY; i=0; while [ $i -lt 600 ]; do sleep 0.1; "
             "i=$((i+1)); done"],
            stdin=slave, stdout=slave, stderr=slave, cwd=self.project, env=self.env,
            start_new_session=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        output = b""
        for _ in range(300):
            if b"READY" in output:
                break
            if select.select([master], [], [], 0.1)[0]:
                output += os.read(master, 4096)
        self.assertIn(b"READY", output)
        raw = termios.tcgetattr(slave)
        self.assertFalse(raw[3] & termios.ECHO, "the command inside made the terminal raw")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(30), 128 + signal.SIGTERM)
        self.assertEqual(termios.tcgetattr(slave), before)
        self.assert_all_gone()

    def test_without_a_terminal_nothing_is_touched(self):
        with bw_lib.terminal_kept(io.StringIO()):
            pass
        with open(os.devnull) as devnull, bw_lib.terminal_kept(devnull):
            pass


# -- 4. misspelt options ------------------------------------------------------------------

class MisspeltOptionTest(ToolsCase, unittest.TestCase):
    def test_typos_and_prefixes_are_refused_with_a_suggestion(self):
        cases = {"--filter-netwrok": "--filter-network", "--filter": "--filter-network",
                 "--unshare-network": "--unshare-net", "--allow-domains": "--allow-domain",
                 "--alow-file": "--allow-file", "--full-home": "--full-home-access",
                 "--dry": "--dry-run", "--allow-presets=npm": "--allow-preset"}
        for token, suggestion in cases.items():
            for profile in (CLAUDE, GEMINI):
                with self.subTest(token=token, tool=profile.tool):
                    with self.assertRaises(Failure) as caught:
                        bw_lib.parse_args(profile, [token])
                    self.assertEqual(caught.exception.code, 2)
                    self.assertIn(f"did you mean {suggestion}", str(caught.exception))

    def test_the_clis_options_pass_through(self):
        for profile in (CLAUDE, GEMINI):
            for option in profile.cli_options:
                with self.subTest(option=option, tool=profile.tool):
                    opts = bw_lib.parse_args(profile, [option, "value"])
                    self.assertEqual(opts.args, [option, "value"])
        opts = bw_lib.parse_args(CLAUDE, ["--model", "opus", "--add-dir", "/x", "--resume",
                                          "-p", "fix the --filter bug", "--", "--filter"])
        self.assertEqual(opts.args, ["--model", "opus", "--add-dir", "/x", "--resume", "-p",
                                     "fix the --filter bug", "--filter"])
        # Far from anything of ours: the CLI's business (a newer CLI's option).
        self.assertEqual(bw_lib.parse_args(CLAUDE, ["--brand-new-option"]).args,
                         ["--brand-new-option"])

    def test_a_typo_starts_nothing(self):
        require_sandbox()
        result = self.bw("--filter-netwrok", "--unshare-net", script="echo ran")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertTrue(one_line(result.stderr), result.stderr)
        self.assertIn("did you mean --filter-network?", result.stderr)
        self.assertNotIn("ran", result.stdout)
        self.assertFalse(os.path.exists(os.path.join(self.project, ".fake-cli-args")))
        self.assert_all_gone()


# -- 5. --allow-file from a pipe, and from places the sandbox can write ---------------------

class AllowFileTest(ToolsCase, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_sandbox("socat", "curl", "bash")
        cls.server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Upstream200)
        cls.port = cls.server.server_address[1]
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()

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

    def test_a_directory_or_a_missing_file_is_refused(self):
        for path, why in ((self.root, "a directory"),
                          (os.path.join(self.root, "nope"), "no such file")):
            with self.subTest(path=path):
                with self.assertRaises(Failure) as caught:
                    bw_lib.allow_file_rules(path, [])
                self.assertIn(why, str(caught.exception))
                self.assertEqual(caught.exception.code, 2)

    def test_rules_are_read_once_here(self):
        read_fd, write_fd = os.pipe()
        os.write(write_fd, b"a.example\n# c\n*.b.example:443  # d\n")
        os.close(write_fd)
        try:
            rules = bw_lib.allow_file_rules(f"/dev/fd/{read_fd}", [])
        finally:
            os.close(read_fd)
        self.assertEqual(rules, ["a.example", "*.b.example:443"])


# -- 7. the session's home on disk ------------------------------------------------------------

class HomeOnDiskTest(ToolsCase, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_sandbox("socat")

    def test_home_and_caches_live_on_disk_only_the_socket_in_the_runtime_dir(self):
        script = ("head -c 1048576 /dev/zero > ~/big; head -c 1048576 /dev/zero > "
                  "$XDG_CACHE_HOME/big; touch ready; i=0; while [ ! -e done ] && [ $i -lt 600 ]; "
                  "do sleep 0.1; i=$((i+1)); done")
        process = subprocess.Popen([sys.executable, BW_CLAUDE, "--filter-network",
                                    "--unshare-net", "--", script], cwd=self.project,
                                   env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.project, "ready"))))
        info = os.lstat(self.base)
        self.assertTrue(stat.S_ISDIR(info.st_mode))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o700)
        [session] = os.listdir(self.base)
        self.assertEqual(os.path.getsize(os.path.join(self.base, session, "home", "big")), 1 << 20)
        self.assertEqual(os.path.getsize(os.path.join(self.base, session, "cache", "big")),
                         1 << 20)
        # Beside the socket's directory: the locks that keep placeholders across sessions.
        [socket_dir] = [e for e in os.listdir(self.runtime) if not e.startswith("bw-locks.")]
        self.assertEqual(os.listdir(os.path.join(self.runtime, socket_dir)), ["proxy.sock"])
        with open(os.path.join(self.project, "done"), "w"):
            pass
        self.assertEqual(process.wait(60), 0, process.stderr.read())
        process.stdout.close()
        process.stderr.close()
        self.assert_all_gone()

    def test_xdg_cache_home_is_honoured(self):
        cache = os.path.join(self.root, "xdg-cache")
        env = {**self.env, "XDG_CACHE_HOME": cache}
        result = self.check(self.bw(script="echo x > ~/f; ls -d " + cache + " 2>&1; true",
                                    env=env))
        self.assertIn("No such file", result.stdout, "the host's cache dir is not shown")
        self.assertEqual(os.listdir(os.path.join(cache, "bw-claude")), [])
        self.assertFalse(os.path.exists(self.base))

    def test_a_session_killed_with_sigkill_is_swept_by_the_next(self):
        script = "touch ready; i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"
        process = subprocess.Popen([sys.executable, BW_CLAUDE, "--filter-network", "--",
                                    script], cwd=self.project, env=self.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.project, "ready"))))
        process.kill()
        process.wait(30)
        self.assertEqual(len(os.listdir(self.base)), 1)
        self.assertTrue(wait_for(lambda: self.bw(script="true").returncode == 0 and
                                 not os.listdir(self.base), 30))
        self.assertTrue(wait_for(lambda: not os.listdir(self.runtime), 10))
        self.assert_all_gone()

    def test_a_base_that_is_a_link_or_open_to_others_is_refused(self):
        elsewhere = os.path.join(self.root, "elsewhere")
        os.makedirs(elsewhere, 0o700)
        os.makedirs(os.path.dirname(self.base), exist_ok=True)
        os.symlink(elsewhere, self.base)
        result = self.bw(script="echo ran")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertTrue(one_line(result.stderr), result.stderr)
        self.assertIn("not a link", result.stderr)
        self.assertNotIn("ran", result.stdout)
        self.assertEqual(os.listdir(elsewhere), [])
        os.unlink(self.base)
        os.mkdir(self.base, 0o755)
        result = self.bw(script="echo ran")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("mode 0700", result.stderr)
        self.assertEqual(os.listdir(self.base), [])
        os.chmod(self.base, 0o700)
        self.assertIn("ran", self.check(self.bw(script="echo ran")).stdout)
        self.assert_all_gone()

    def test_other_sessions_are_hidden_from_full_home_access(self):
        # Another tool's session (bw-gemini's), and bw-claude's own, under ~/.cache: its
        # home is not this sandbox's to read.
        other = self.write_home(".cache/bw-gemini/bw-gemini.abcdefgh/home/secret", "other\n")
        os.chmod(os.path.dirname(os.path.dirname(os.path.dirname(other))), 0o700)
        self.write_home(".cache/app/visible", "visible\n")
        result = self.check(self.bw("--full-home-access", script=(
            "cat ~/.cache/app/visible; ls -A ~/.cache/bw-gemini ~/.cache/bw-claude; "
            "grep -rs other ~/.cache; true")))
        self.assertEqual(result.stdout.split(), ["visible", f"{self.home}/.cache/bw-claude:",
                                                 f"{self.home}/.cache/bw-gemini:"])
        with open(other) as f:
            self.assertEqual(f.read(), "other\n")
        # Nor can a session directory be shown on request (its placeholders.json is what
        # the next run's sweep reads).
        result = self.bw("--allow-rw", os.path.dirname(os.path.dirname(other)),
                         script="echo forged > ../placeholders.json")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("keeps its sessions' homes there", result.stderr)
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(os.path.dirname(other)),
                                                     "placeholders.json")))


# -- 8. the README says what the code does ---------------------------------------------------

class ReadmeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(os.path.join(REPO, "README.md")) as f:
            cls.readme = f.read()

    def says(self, text):
        self.assertTrue(text in self.readme, f"the README does not say {text!r}")

    def test_one_python_version(self):
        stated = set(re.findall(r"Python (3\.\d+)(?: or newer| or later)", self.readme))
        self.assertEqual(len(stated), 1, stated)
        self.assertIn(f"Python {stated.pop()} or later", bw_lib.__doc__.replace("\n", " "))

    def test_how_to_install_the_clis_and_where_they_are_looked_for(self):
        for profile in PROFILES.values():
            self.says(profile.install_hint)
            for place in profile.lookup:
                self.says(f"~/{place}")
        self.says("https://claude.ai/install.sh")

    def test_root_commands_without_sudo(self):
        self.assertFalse("sudo " in self.readme, "the README assumes sudo")
        self.says("as root")

    def test_the_exit_summary_is_described_as_the_code_prints_it(self):
        self.assertFalse("At exit one line on stderr" in self.readme)
        self.says("a small table")
        self.says("## Package managers inside")


if __name__ == "__main__":
    unittest.main()
