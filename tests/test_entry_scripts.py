"""The entry scripts: each reads as one session's life and works copied or linked anywhere,
and one without bw_lib.py beside it says so in one line."""

import os
import shlex
import shutil
import subprocess
import sys
import unittest

from tests.sandbox_harness import REPO, SCRIPTS, install_copy, temporary_root


class EntryScriptTest(unittest.TestCase):
    def setUp(self):
        self.dir = temporary_root(self, "bw-entry-")

    def run_script(self, path, *argv):
        return subprocess.run([sys.executable, path, *argv], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "HOME": self.dir})

    def test_a_script_copied_alone_says_so_in_one_line(self):
        for name in SCRIPTS:
            with self.subTest(script=name):
                alone = os.path.join(self.dir, name)
                shutil.copy(os.path.join(REPO, name), alone)
                result = self.run_script(alone, "--help")
                self.assertEqual(result.returncode, 1)
                self.assertEqual(result.stdout, "")
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertIn(f"{name}: ", result.stderr)
                self.assertIn(f"keep bw_lib.py next to {alone}", result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    def test_a_copy_with_the_library_and_a_link_to_it_work(self):
        install_copy(self.dir)
        links = os.path.join(self.dir, "bin")
        os.mkdir(links)
        for name in SCRIPTS:
            os.symlink(os.path.join(self.dir, name), os.path.join(links, "my-" + name))
            for path in (os.path.join(self.dir, name), os.path.join(links, "my-" + name)):
                with self.subTest(script=path):
                    result = self.run_script(path, "--list-presets")
                    self.assertEqual(result.returncode, 0, result.stderr)
                    self.assertIn("github.com:443", result.stdout)

    def test_a_wrapper_inside_a_writable_directory_refuses_to_run(self):
        # The agent could rewrite bw_lib.py (or its bytecode) there, and the next session
        # would run that on the host: the session never starts, the file stays as it was.
        project = os.path.join(self.dir, "project")
        tools = os.path.join(project, "tools")
        install_copy(tools)
        other = os.path.join(self.dir, "other")
        os.mkdir(other)
        for argv in (["--dir", project], ["--dir", other, "--allow-rw", tools]):
            with self.subTest(argv=argv):
                self.refused(self.run_script(os.path.join(tools, "bw-claude"), *argv,
                                             "--shell", "--", "-c", "echo ran"))
        with open(os.path.join(tools, "bw_lib.py")) as f, \
                open(os.path.join(REPO, "bw_lib.py")) as g:
            self.assertEqual(f.read(), g.read())

    def refused(self, result):
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("ran", result.stdout)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("the sandbox could write there", result.stderr)

    def test_what_else_runs_with_the_wrapper_is_never_writable_inside(self):
        project = os.path.join(self.dir, "project")
        os.makedirs(project)
        shell = ["--shell", "--", "-c", "echo ran"]
        script = install_copy(os.path.join(self.dir, "bin"))
        with self.subTest("the bytecode cache as an --allow-rw directory"):
            cache = os.path.join(self.dir, "bin", "__pycache__")
            os.makedirs(cache, exist_ok=True)
            self.refused(self.run_script(script, "--dir", project, "--allow-rw", cache, *shell))
        with self.subTest("one file of the wrapper linked into the project"):
            shutil.copy(os.path.join(REPO, "socks_filter.py"), project)
            linked = os.path.join(self.dir, "bin", "socks_filter.py")
            os.unlink(linked)
            os.symlink(os.path.join(project, "socks_filter.py"), linked)
            self.refused(self.run_script(script, "--dir", project, *shell))
            os.unlink(linked)
            shutil.copy(os.path.join(REPO, "socks_filter.py"), linked)
        with self.subTest("the python3 of the project's activated venv"):
            venv = os.path.join(project, ".venv", "bin")
            os.makedirs(venv)
            os.symlink(os.path.realpath(sys.executable), os.path.join(venv, "python3"))
            result = subprocess.run(
                [script, "--dir", project, *shell], capture_output=True, text=True, timeout=60,
                env={**os.environ, "HOME": self.dir, "PATH": venv + os.pathsep + os.defpath})
            self.refused(result)

    def test_closed_standard_streams_keep_the_exit_status(self):
        # Descriptors 0-2 closed: no pipe of the wrapper's takes their numbers, and the
        # CLI's exit status survives the flush at the end.
        script = install_copy(os.path.join(self.dir, "bin"))
        project = os.path.join(self.dir, "project")
        os.makedirs(project)
        for extra, closing in (([], ">&-"), (["--filter-network"], "<&- >&-")):
            with self.subTest(extra=extra):
                command = " ".join([shlex.quote(script), "--dir", shlex.quote(project), *extra,
                                    "--shell", "--", "-c", "'exit 3'", closing])
                result = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                                        timeout=60, env={**os.environ, "HOME": self.dir})
                self.assertEqual(result.returncode, 3, result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    def test_the_scripts_differ_only_in_their_profile(self):
        # All logic is shared in bw_lib.py: the two scripts are the same text but for the
        # profile's name and the CLI's name in their docstring.
        with open(os.path.join(REPO, "bw-claude")) as f:
            claude = f.read()
        with open(os.path.join(REPO, "bw-gemini")) as f:
            gemini = f.read()
        self.assertEqual(claude.replace("Claude Code", "Gemini CLI").replace("claude", "gemini"),
                         gemini)
        self.assertLess(len(claude.splitlines()), 30)


if __name__ == "__main__":
    unittest.main()
