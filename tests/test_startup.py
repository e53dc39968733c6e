"""Start-up: what was made faster still does what it did.  The entry scripts run
isolated (python3 -I -S through their own shebang); the proxy's interpreter started before the
plan never listens without its arguments, never follows a link for its stderr file and never
outlives a session that failed; --verbose says where start-up time went; the records that
replace dataclasses keep their contracts; the quick exit keeps the status and the output;
what replaces subprocess, shutil.rmtree, hashlib and json on the start path does what they
did; a start imports none of the modules it no longer needs."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import bw_lib
from tests.sandbox_harness import (FAKE_CLI, REPO, install_copy, processes_mentioning,
                                   require_tools, temporary_root, wait_for, write_file)


class Session(unittest.TestCase):
    """A copy of the scripts in a fresh directory (so its proxy is recognisable by path), a
    fake claude on PATH, a throwaway HOME and project."""

    def setUp(self):
        self.root = temporary_root(self, "bw-startup-")
        os.chmod(self.root, 0o755)
        self.scripts = os.path.dirname(install_copy(os.path.join(self.root, "scripts")))
        self.bin = os.path.join(self.root, "bin")
        self.home = os.path.join(self.root, "home")
        self.project = os.path.join(self.root, "project")
        for path in (self.home, self.project):
            os.mkdir(path)
        write_file(os.path.join(self.bin, "claude"), FAKE_CLI, 0o755)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.lower().endswith("_proxy") and k != "XDG_RUNTIME_DIR"}
        self.env.update(HOME=self.home, PATH=self.bin + os.pathsep + os.environ["PATH"])

    def run_script(self, *argv, env=None, name="bw-claude"):
        # Executed directly: its shebang (env -S python3 -I -S) is what runs it.
        return subprocess.run([os.path.join(self.scripts, name), *argv], cwd=self.project,
                              env=env or self.env, capture_output=True, text=True, timeout=120)


class IsolatedInterpreterTest(Session):
    def test_python_variables_cannot_put_code_into_the_wrapper(self):
        # Whoever sets PYTHONPATH or PYTHONSTARTUP-like variables for the user's shell (a
        # project's .envrc, say) must not get code run by the wrapper on the host: -I ignores
        # PYTHON* variables and -S skips site (and its sitecustomize).
        planted = os.path.join(self.root, "planted")
        os.mkdir(planted)
        marker = os.path.join(self.root, "ran")
        payload = f"open({marker!r}, 'w').write('pwned')\n"
        for module in ("argparse.py", "sitecustomize.py", "usercustomize.py", "json.py"):
            with open(os.path.join(planted, module), "w") as f:
                f.write(payload)
        env = {**self.env, "PYTHONPATH": planted, "PYTHONUSERBASE": planted,
               "PYTHONSTARTUP": os.path.join(planted, "json.py")}
        for name in ("bw-claude", "bw-gemini"):
            with self.subTest(script=name):
                result = self.run_script("--list-presets", env=env, name=name)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn("github.com:443", result.stdout)
                self.assertFalse(os.path.exists(marker), "a planted module ran in the wrapper")

    def test_the_shebang_asks_for_an_isolated_interpreter(self):
        for name in ("bw-claude", "bw-gemini"):
            with open(os.path.join(REPO, name)) as f:
                self.assertEqual(f.readline(), "#!/usr/bin/env -S python3 -I -S\n")


class EarlyProxyTest(Session):
    def interpreter(self):
        early = bw_lib.ProxyInterpreter(dict(os.environ))
        self.addCleanup(early.stop)
        return early

    def test_without_its_arguments_it_exits_and_never_listens(self):
        early = self.interpreter()
        fd = early.ready_fd
        early.stdin.close()                    # the wrapper gave up (or died)
        self.assertTrue(wait_for(lambda: early.process.poll() is not None))
        self.assertEqual(early.process.returncode, 0)
        self.assertEqual(os.read(fd, 100), b"")  # no ready line: it never listened
        early.stop()
        self.assertIsNone(early.ready_fd)

    def test_stop_ends_a_waiting_interpreter(self):
        early = self.interpreter()
        early.stop()
        self.assertIsNotNone(early.process.returncode)

    def test_it_listens_once_handed_its_arguments(self):
        early = self.interpreter()
        private = tempfile.mkdtemp(dir=self.root)
        sock = os.path.join(private, "proxy.sock")
        err = os.path.join(private, "proxy.err")
        early.hand(["--listen", sock, "--allow", "example.com:443",
                    "--log", os.path.join(private, "proxy.log"),
                    "--ready-fd", str(early.ready_number)], err)
        line = bw_lib.read_until(early.ready_fd, 20, b"\n").decode().strip()
        self.assertEqual(line, "ready " + sock)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(sock)
        self.assertEqual(os.stat(err).st_mode & 0o777, 0o600)
        early.stop()
        self.assertIsNotNone(early.process.returncode)

    def test_its_stderr_file_is_never_written_through_a_link(self):
        early = self.interpreter()
        private = tempfile.mkdtemp(dir=self.root)
        victim = os.path.join(self.root, "victim")
        with open(victim, "w") as f:
            f.write("host file\n")
        err = os.path.join(private, "proxy.err")
        os.symlink(victim, err)
        sock = os.path.join(private, "proxy.sock")
        early.hand(["--listen", sock, "--bogus-option-to-make-it-write-an-error",
                    "--ready-fd", str(early.ready_number)], err)
        self.assertEqual(bw_lib.read_until(early.ready_fd, 20, b"\n").decode().strip(), "")
        self.assertTrue(wait_for(lambda: early.process.poll() is not None))
        self.assertNotEqual(early.process.returncode, 0)
        with open(victim) as f:
            self.assertEqual(f.read(), "host file\n")
        self.assertFalse(os.path.exists(sock))

    def test_a_session_that_fails_after_the_early_start_leaves_no_proxy(self):
        filter_script = os.path.join(self.scripts, "socks_filter.py")
        result = self.run_script("--filter-network", "--shell", "--dir",
                                 os.path.join(self.root, "missing"), "--", "-c", "true")
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("not a directory", result.stderr)
        self.assertTrue(wait_for(lambda: not processes_mentioning(filter_script), 5),
                        "the proxy's interpreter outlived the wrapper")

    def test_a_filtered_session_runs_and_leaves_no_proxy(self):
        require_tools("bwrap")
        require_tools("socat")
        filter_script = os.path.join(self.scripts, "socks_filter.py")
        result = self.run_script("--filter-network", "--shell", "--",
                                 "-c", 'test -n "$HTTPS_PROXY" && echo bridged')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, "bridged\n")
        self.assertIn("network: 0 allowed, 0 blocked", result.stderr)
        self.assertTrue(wait_for(lambda: not processes_mentioning(filter_script), 5))


class VerboseTimingsTest(Session):
    def test_verbose_says_where_start_up_time_went(self):
        require_tools("bwrap")
        result = self.run_script("-v", "--shell", "--", "-c", "true")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = [l for l in result.stderr.splitlines() if l.startswith("bw-claude: start-up: ")]
        self.assertEqual(len(lines), 1, result.stderr)
        for phase in ("imports", "options", "plan", "directories", "state", "git snapshot",
                      "protection", "bwrap arguments"):
            self.assertRegex(lines[0], rf"\b{phase} [0-9.]+ ms")
        self.assertRegex(lines[0], r"; [0-9]+ ms in all, then bwrap$")
        ends = [l for l in result.stderr.splitlines() if l.startswith("bw-claude: end: ")]
        self.assertEqual(len(ends), 1, result.stderr)
        for phase in ("placeholders", "git check", "state", "directories"):
            self.assertRegex(ends[0], rf"\b{phase} [0-9.]+ ms")
        self.assertRegex(ends[0], r"; [0-9]+ ms in all after bwrap$")
        self.assertGreater(result.stderr.index("bw-claude: end: "),
                           result.stderr.index("bw-claude: start-up: "))

    def test_without_verbose_nothing_is_said(self):
        require_tools("bwrap")
        result = self.run_script("--shell", "--", "-c", "true")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("start-up", result.stderr)
        self.assertNotIn("end:", result.stderr)

    def test_the_clock_adds_up_its_phases(self):
        clock = bw_lib.StartupClock(time.perf_counter())
        clock.mark("one")
        clock.mark("two")
        self.assertEqual([name for name, _ in clock.phases], ["one", "two"])
        self.assertTrue(all(seconds >= 0 for _, seconds in clock.phases))
        self.assertRegex(clock.line("bw-x"),
                         r"^bw-x: start-up: one [0-9.]+ ms, two [0-9.]+ ms; [0-9]+ ms in all")


class RecordsTest(unittest.TestCase):
    def test_a_frozen_record_refuses_changes_and_is_hashable(self):
        state = bw_lib.State(".claude/x", back="keys", keys=("a",))
        with self.assertRaises(AttributeError):
            state.path = "/etc/passwd"
        with self.assertRaises(AttributeError):
            del state.seed
        self.assertEqual(state, bw_lib.State(".claude/x", "copy", "keys", ("a",)))
        self.assertNotEqual(state, bw_lib.State(".claude/y", back="keys", keys=("a",)))
        self.assertEqual(len({state, bw_lib.State(".claude/x", back="keys", keys=("a",))}), 1)
        self.assertEqual(repr(state), "State(path='.claude/x', seed='copy', back='keys', "
                                      "keys=('a',))")

    def test_a_plain_record_gets_fresh_defaults_and_checks_its_arguments(self):
        one = bw_lib.Plan(profile=None, home="/h", project="/p", command=[], env={})
        two = bw_lib.Plan(None, "/h", "/p", [], {})
        one.mounts.append(("--bind", "/x", "/x"))
        self.assertEqual(two.mounts, [])
        self.assertIsNone(two.early_proxy)
        with self.assertRaises(TypeError):
            hash(one)
        with self.assertRaises(TypeError):
            bw_lib.Plan(profile=None, home="/h", project="/p", command=[])      # no env
        with self.assertRaises(TypeError):
            bw_lib.Plan(None, "/h", "/p", [], {}, home="/again")
        with self.assertRaises(TypeError):
            bw_lib.Plan(None, "/h", "/p", [], {}, no_such_field=1)


class SpawnTest(unittest.TestCase):
    """spawn() in place of subprocess.Popen: only the descriptors asked for reach the
    program (an inheritable one the wrapper was started with would otherwise reach the
    sandbox), SIGPIPE is back to its default, waits are bounded."""

    def test_only_the_descriptors_asked_for_are_passed(self):
        inherited = os.open("/", os.O_RDONLY | os.O_DIRECTORY)     # a host directory
        os.set_inheritable(inherited, True)
        passed = os.open(os.devnull, os.O_RDONLY)
        read_end, write_end = os.pipe()
        try:
            script = (f"for fd in {inherited} {passed}; do if [ -e /proc/self/fd/$fd ]; "
                      f"then echo $fd open; else echo $fd closed; fi; done >&{write_end}")
            child = bw_lib.spawn(["/bin/sh", "-c", script], dict(os.environ),
                                 pass_fds=(write_end, passed))
            os.close(write_end)
            self.assertEqual(child.wait(30), 0)
            with os.fdopen(read_end) as f:
                said = f.read().splitlines()
            self.assertEqual(said, [f"{inherited} closed", f"{passed} open"])
            self.assertFalse(os.get_inheritable(passed))      # as it was, in the wrapper
        finally:
            os.close(inherited)
            os.close(passed)

    def test_sigpipe_is_the_default_again_and_a_new_session_on_request(self):
        child = bw_lib.spawn(["/bin/sh", "-c", "kill -PIPE $$; exit 3"], dict(os.environ))
        self.assertEqual(child.wait(30), -13)      # SIGPIPE killed it: not ignored
        read_end, write_end = os.pipe()
        child = bw_lib.spawn(["/bin/sh", "-c", f"cut -d' ' -f6 /proc/$$/stat >&{write_end}"],
                             dict(os.environ), pass_fds=(write_end,), new_session=True)
        os.close(write_end)
        self.assertEqual(child.wait(30), 0)
        with os.fdopen(read_end) as f:
            self.assertEqual(int(f.read()), child.pid)     # its own session's leader

    def test_stop_is_bounded_and_kills_what_lingers(self):
        child = bw_lib.spawn(["/bin/sh", "-c", "trap '' TERM; sleep 30"], dict(os.environ))
        time.sleep(0.2)
        started = time.monotonic()
        bw_lib.stop(child, bw_lib.signal.SIGTERM)
        self.assertEqual(child.returncode, -9)
        self.assertLess(time.monotonic() - started, bw_lib.STOP_SECONDS + 5)
        with self.assertRaises(TimeoutError):
            bw_lib.spawn(["/bin/sleep", "5"], dict(os.environ)).wait(0.1)


class RemoveTreeTest(unittest.TestCase):
    """remove_tree in place of shutil.rmtree, on what a sandbox leaves in its home."""

    def test_links_are_removed_never_followed_and_locked_directories_emptied(self):
        root = temporary_root(self, "bw-rmtree-")
        victim = write_file(os.path.join(root, "victim", "keep"), "mine\n", 0o644)
        tree = os.path.join(root, "session")
        write_file(os.path.join(tree, "home", "a", "b", "file"), "x", 0o644)
        os.symlink(os.path.dirname(victim), os.path.join(tree, "home", "a", "out"))
        os.symlink(victim, os.path.join(tree, "home", "file-out"))
        write_file(os.path.join(tree, "home", "locked", "inner", "x"), "x", 0o644)
        os.chmod(os.path.join(tree, "home", "locked", "inner"), 0)
        os.chmod(os.path.join(tree, "home", "locked"), 0o500)
        deep = os.open(os.path.join(tree, "home"), os.O_RDONLY)
        for _ in range(3000):           # deeper than Python's recursion limit
            os.mkdir("d", dir_fd=deep)
            inner = os.open("d", os.O_RDONLY, dir_fd=deep)
            os.close(deep)
            deep = inner
        os.close(deep)
        open_before = len(os.listdir("/proc/self/fd"))
        bw_lib.remove_tree(tree)
        self.assertFalse(os.path.lexists(tree))
        with open(victim) as f:
            self.assertEqual(f.read(), "mine\n")
        self.assertEqual(len(os.listdir("/proc/self/fd")), open_before)
        bw_lib.remove_tree(tree)        # gone: nothing to do, no error


class LeanStartTest(Session):
    """A session's start and end import none of the standard modules it no longer needs
    (each costs milliseconds of every start); hashes and records without them are right."""

    NOT_IMPORTED = ("subprocess", "shutil", "tempfile", "json", "hashlib", "contextlib",
                    "collections", "glob", "fnmatch", "enum", "signal", "shlex", "argparse",
                    "gettext", "textwrap", "difflib")

    def test_a_session_imports_none_of_them(self):
        driver = (
            "import sys; sys.path.insert(0, sys.argv[1]); import bw_lib\n"
            "sys.argv[0] = sys.argv[2]\n"
            "try:\n"
            "    with bw_lib.Wrapper('claude') as session:\n"
            "        plan = session.plan(['--shell', '--', '-c', 'true'])\n"
            "        with bw_lib.SessionDirs(plan) as dirs, bw_lib.FilterProxy(plan, dirs) as p:\n"
            "            session.status = bw_lib.run_sandbox(plan, dirs, p)\n"
            "finally:\n"
            "    print(' '.join(sorted(sys.modules)), file=sys.stderr)\n")
        result = subprocess.run(
            [sys.executable, "-I", "-S", "-c", driver, self.scripts,
             os.path.join(self.scripts, "bw-claude")], cwd=self.project, env=self.env,
            capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        loaded = set(result.stderr.split())
        self.assertIn("bw_lib", loaded)
        self.assertEqual(sorted(loaded & set(self.NOT_IMPORTED)), [])

    def test_hashes_without_hashlib_are_hashlib_s(self):
        import hashlib
        for data in (b"", b"abc" * 1000):
            self.assertEqual(bw_lib.hash_of("sha1", data), hashlib.sha1(data).digest())
            self.assertEqual(bw_lib.hash_of("sha256", data), hashlib.sha256(data).digest())

    def test_a_json_snapshot_left_by_an_earlier_version_is_still_read(self):
        private = temporary_root(self, "bw-snap-")
        snapshot = {"roots": [self.project], "since": 1, "complete": True, "cut": False,
                    "entries": {}}
        write_file(os.path.join(private, bw_lib.GIT_SNAPSHOT_JSON), json.dumps(snapshot), 0o600)
        self.assertEqual(bw_lib.read_git_snapshot(private), snapshot)
        bw_lib.take_git_snapshot([self.project], os.path.join(private, "new") if
                                 os.mkdir(os.path.join(private, "new")) is None else None)
        self.assertEqual(bw_lib.read_git_snapshot(os.path.join(private, "new"))["roots"],
                         [self.project])


class QuickExitTest(Session):
    def test_the_status_and_the_output_survive_the_quick_exit(self):
        result = self.run_script("--dry-run", "--shell")      # stdout is a pipe: buffered
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.endswith("\n"))
        self.assertIn("bwrap", result.stdout)
        require_tools("bwrap")
        result = self.run_script("--shell", "--", "-c", "exit 7")
        self.assertEqual(result.returncode, 7, result.stderr)
        result = self.run_script("--shell", "--dir", os.path.join(self.root, "missing"))
        self.assertEqual(result.returncode, 1)
        self.assertIn("bw-claude: error: --dir", result.stderr)


if __name__ == "__main__":
    unittest.main()
