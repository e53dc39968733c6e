"""The tools agents really run, inside the sandbox: the real npm, pip and git against a
registry, an index and a repository on the host's loopback (127.0.0.2, reached through
--filter-network --unshare-net and an IP rule) with host caches that must stay untouched;
Node's own fetch; the terminal after SIGTERM, under a real pty."""

import base64
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import select
import stat
import subprocess
import tarfile
import tempfile
import termios
import unittest
import zipfile

import bw_lib
from tests.sandbox_harness import BODY, Answers, SessionCase, http_server, missing

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


class Served(Answers, http.server.SimpleHTTPRequestHandler):
    """Static files from `directory`, and JSON documents by path (an npm package document
    is /NAME, while /NAME/-/ holds its tarball: a file cannot be both)."""
    documents = {}

    def do_GET(self):
        document = self.documents.get(self.path.split("?")[0])
        if document is None:
            return super().do_GET()
        self.answer(document, "application/json")


def serve(directory, cleanup):
    """A threaded HTTP server of `directory` on 127.0.0.2 (a host loopback address the
    sandbox reaches only through the proxy and an IP rule), stopped through `cleanup`:
    (server, base URL, its documents)."""
    documents = {}
    handler = type("Handler", (Served,), {"documents": documents})
    server = http_server(cleanup, "127.0.0.2",
                         lambda *a, **k: handler(*a, directory=directory, **k))
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
    """Session directories, a fake CLI, /usr/local/bin on PATH (where node and npm may be)."""

    PREFIX = "bw-tools-"
    PATH = "/usr/local/bin:/usr/bin:/bin"


# -- package managers -------------------------------------------------------------------------

class PackageManagersTest(ToolsCase):
    """npm install, pip install and git clone from loopback, with host caches present."""

    TOOLS = ("socat", "npm", "node", "git")

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.served = tempfile.mkdtemp(prefix="bw-served-")
        cls.addClassCleanup(shutil.rmtree, cls.served, True)
        cls.server, cls.url, documents = serve(cls.served, cls.addClassCleanup)
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


# -- Node's own fetch ----------------------------------------------------------------------


class NodeFetchTest(ToolsCase):
    TOOLS = ("socat", "node")

    def test_fetch_inside_and_what_doctor_says(self):
        port = http_server(self.addCleanup, "127.0.0.2").server_address[1]
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


# -- the terminal after SIGTERM ---------------------------------------------------------


class TerminalTest(ToolsCase):
    def test_sigterm_restores_the_terminal_the_cli_made_raw(self):
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        modes = termios.tcgetattr(slave)
        modes[0] |= termios.ICRNL
        modes[3] |= termios.ECHO | termios.ICANON | termios.ISIG
        termios.tcsetattr(slave, termios.TCSANOW, modes)
        before = termios.tcgetattr(slave)
        process = self.popen("--shell", "--", "-c",
                             "stty raw -echo; echo READY; i=0; while [ $i -lt 600 ]; do "
                             "sleep 0.1; i=$((i+1)); done",
                             stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
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



if __name__ == "__main__":
    unittest.main()
