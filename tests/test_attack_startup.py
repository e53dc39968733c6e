"""Attacks on the start-up change (issue 15): what the sandbox writes is read by host code
after bwrap ends (the session's home removed by remove_tree, transcripts sent back by
lines_update, the git check importing hash modules at the end), by the next session (the
lock lists of a session killed with SIGKILL), and what the wrapper hands to the programs it
starts (spawn).  Every test runs the real wrapper with a fake CLI and asserts what is left on
the host.  No traffic leaves the machine (no network is used at all)."""

import json
import os
import resource
import subprocess
import sys
import unittest

import bw_lib
from tests.sandbox_harness import (SessionCase, processes_mentioning, read_text,
                                   require_tools, wait_for, write_file)


def lowered_open_files(limit):
    """A preexec_fn: the wrapper starts with RLIMIT_NOFILE's soft limit at `limit` (the
    usual 1024 of a login, scaled down so that the tree below stays small)."""
    def apply():
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    return apply


def json_lines(data):
    """Whether every line of `data` (split as a JSONL reader splits: on \\n only) parses."""
    for line in data.split(b"\n")[:-1]:
        try:
            json.loads(line.decode("utf-8"))
        except ValueError:
            return False
    return data.endswith(b"\n") or not data


class SessionHomeRemovalTest(SessionCase):
    """remove_tree on the home the sandbox wrote: all of it goes, nothing outside is touched."""

    PREFIX = "bw-attack-rm-"

    def test_a_tree_deeper_than_the_open_files_limit_is_removed(self):
        # One descriptor per level: at RLIMIT_NOFILE the walk stops and the rest stays, in
        # ~/.cache/bw-claude, for ever (every later sweep stops at the same depth).  As
        # before the change (shutil.rmtree keeps a descriptor per level too); a login's
        # usual 1024 also fails test_startup's RemoveTreeTest (3,000 levels).
        script = ("cd ~ && python3 -c 'import os\n"
                  "fd = os.open(\".\", os.O_RDONLY)\n"
                  "for _ in range(400):\n"
                  "    os.mkdir(\"d\", dir_fd=fd); i = os.open(\"d\", os.O_RDONLY, dir_fd=fd)\n"
                  "    os.close(fd); fd = i\n"
                  "print(\"deep\")'")
        result = self.shell(script, code=0, preexec_fn=lowered_open_files(256))
        self.assertIn("deep", result.stdout)
        self.assertEqual(os.listdir(self.base) if os.path.isdir(self.base) else [], [],
                         "the session's home was left on the host")
        self.check(self.bw("--shell", "--", "-c", "true", preexec_fn=lowered_open_files(256)))
        self.assertEqual(os.listdir(self.base), [], "the next session's sweep left it too")

    def test_links_and_locked_directories_never_reach_outside(self):
        victim = os.path.join(self.root, "victim")
        keep = write_file(os.path.join(victim, "keep"), "mine\n", 0o640)
        os.chmod(victim, 0o750)
        script = (f"cd ~ && ln -s {victim} out && ln -s {keep} keep-link && "
                  f"ln -s {victim} .claude/out && mkdir -p locked/inner && touch locked/inner/f "
                  f"&& ln -s {victim} locked/inner/out && chmod 0 locked/inner && "
                  f"chmod 500 locked && mkfifo fifo && chmod 0 . ; echo planted")
        self.assertIn("planted", self.shell(script, code=0).stdout)
        self.assertEqual(read_text(keep), "mine\n")
        self.assertEqual(os.stat(victim).st_mode & 0o7777, 0o750)
        self.assertEqual(os.stat(keep).st_mode & 0o7777, 0o640)
        self.assertEqual(sorted(os.listdir(victim)), ["keep"])
        self.assert_all_gone()


class SpawnedDescriptorsTest(SessionCase):
    """spawn(): an inheritable descriptor the wrapper was started with never reaches bwrap
    or the sandbox (a directory descriptor there would be the whole host filesystem)."""

    PREFIX = "bw-attack-fd-"

    def test_inherited_directory_descriptors_are_closed(self):
        outside = os.path.join(self.root, "outside")
        os.mkdir(outside)
        directory = os.open(outside, os.O_RDONLY | os.O_DIRECTORY)
        path_fd = os.open(outside, os.O_PATH | os.O_DIRECTORY)
        self.addCleanup(os.close, directory)
        self.addCleanup(os.close, path_fd)
        script = "; ".join(f"echo pwned > /proc/self/fd/{fd}/written-{fd} 2>/dev/null; "
                           f"ls /proc/self/fd/{fd}/ >/dev/null 2>&1 && echo SEEN {fd}"
                           for fd in (directory, path_fd)) + "; echo done"
        result = self.shell(script, code=0, pass_fds=(directory, path_fd))
        self.assertIn("done", result.stdout)
        self.assertNotIn("SEEN", result.stdout)
        self.assertEqual(os.listdir(outside), [])


class TranscriptLinesTest(SessionCase):
    """lines_update: only complete JSON lines appended to what the session was given go back,
    so the host's transcript stays a file of JSON lines."""

    PREFIX = "bw-attack-tx-"

    def transcripts(self):
        return os.path.join(self.home, ".claude", "projects", bw_lib.project_slug(self.project))

    def test_a_host_transcript_without_its_last_newline_is_not_completed_into_garbage(self):
        # The seeded size ends inside the host's last line: what the session appends is
        # checked alone ("{}" is JSON) but lands after the host's partial line.  (New: the
        # hash-based check parsed the whole of the session's file.)
        partial = b'{"type":"user","message":"abc'
        path = os.path.join(self.transcripts(), "s1.jsonl")
        os.makedirs(self.transcripts(), 0o700)
        with open(path, "wb") as f:
            f.write(partial)
        self.shell("printf '{}\\n' >> ~/.claude/projects/*/s1.jsonl", code=0)
        with open(path, "rb") as f:
            data = f.read()
        self.assertTrue(data == partial or json_lines(data[data.rfind(b"\n", 0, -1) + 1:]),
                        f"a line that is not JSON reached the host's transcript: {data!r}")

    def test_a_line_with_a_carriage_return_inside_does_not_reach_the_host(self):
        # complete_lines splits with bytes.splitlines (\r too); a JSONL reader splits on \n.
        # (As before the change.)
        os.makedirs(self.transcripts(), 0o700)
        self.shell("cd ~/.claude/projects/*/ && "
                   "printf '{\"a\":1}\\r{\"b\":2}\\n' > s3.jsonl", code=0)
        path = os.path.join(self.transcripts(), "s3.jsonl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            self.assertTrue(json_lines(data), repr(data))

    def test_nan_infinity_and_rewritten_transcripts_never_reach_the_host(self):
        os.makedirs(self.transcripts(), 0o700)
        seeded = b'{"n":1}\n'
        for name in ("a.jsonl", "b.jsonl"):
            with open(os.path.join(self.transcripts(), name), "wb") as f:
                f.write(seeded)
        self.shell("cd ~/.claude/projects/*/ && printf '{\"x\":NaN}\\n{\"y\":Infinity}\\n' "
                   ">> a.jsonl && printf '{\"n\":2}\\n{\"n\":3}\\n' > b.jsonl", code=0)
        for name in ("a.jsonl", "b.jsonl"):
            with open(os.path.join(self.transcripts(), name), "rb") as f:
                self.assertEqual(f.read(), seeded, name)

    def test_another_projects_history_never_reaches_the_sandbox(self):
        secret = "SECRET-OF-OTHER"
        lines = [{"display": "mine", "project": self.project},
                 {"display": f'cd "{self.project}" {secret}1', "project": "/elsewhere"},
                 {"display": f"{secret}2", "meta": {"project": self.project},
                  "project": "/elsewhere"},
                 {"project": self.project, "project2": "x", "display": "mine too"}]
        text = "".join(json.dumps(line) + "\n" for line in lines)
        text += json.dumps({"project": "/elsewhere", "display": secret + "3"}).replace(
            '"project"', '"project": "' + self.project + '", "project"') + "\n"
        self.write_home(".claude/history.jsonl", text, 0o600)
        result = self.shell("cat ~/.claude/history.jsonl", code=0)
        self.assertIn("mine", result.stdout)
        self.assertNotIn(secret, result.stdout)


class LegacyLockListTest(SessionCase):
    """RootLock's list became NAME.list (was NAME.json): a session of the earlier version
    killed with SIGKILL left NAME.json, NAME.lock and its placeholders in the project."""

    PREFIX = "bw-attack-lock-"

    def test_placeholders_of_a_killed_earlier_version_are_swept(self):
        # sweep() lists only .list and .lock: the .json is never read, so its root is "",
        # its placeholders stay in the project and LOCKS_DIR is never empty again.
        process = self.popen("--shell", "--", "-c", "touch started; sleep 60")
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.project, "started"))))
        locks = os.path.join(self.runtime, bw_lib.LOCKS_DIR.format(uid=os.geteuid()))
        lists = [n for n in os.listdir(locks) if n.endswith(bw_lib.LIST_FILE)]
        self.assertEqual(len(lists), 1, os.listdir(locks))
        process.kill()
        process.communicate(timeout=30)     # reaped, its pipes closed
        self.assertTrue(wait_for(lambda: not processes_mentioning("sleep 60")))
        # What the earlier version left: the same list as JSON.
        with open(os.path.join(locks, lists[0]), "rb") as f:
            root, *placeholders = [os.fsdecode(p) for p in f.read().split(b"\0")]
        os.unlink(os.path.join(locks, lists[0]))
        write_file(os.path.join(locks, lists[0][:-len(bw_lib.LIST_FILE)] + ".json"),
                   json.dumps({"root": root, "placeholders": placeholders}), 0o600)
        os.unlink(os.path.join(self.project, "started"))
        other = os.path.join(self.root, "other")
        os.mkdir(other)
        self.check(self.bw("--shell", "--", "-c", "true", cwd=other))
        self.assertEqual(sorted(os.listdir(self.project)), [],
                         "the killed session's placeholders stayed in the project")
        self.assertFalse(os.path.lexists(locks), locks)


class EndOfSessionImportsTest(SessionCase):
    """Modules imported at their first use run after the sandbox did: none may come from a
    directory the sandbox could write."""

    PREFIX = "bw-attack-imp-"

    def test_a_missing_hash_module_is_not_searched_for_in_the_project(self):
        # hash_of tries "_sha2" first; before Python 3.12 there is none, so the import walks
        # all of sys.path, past the standard library into site-packages and the directories
        # .pth files add (an editable install of the project: pip install --user -e).
        require_tools("git")
        lib = os.path.join(self.project, "lib")
        os.mkdir(lib)
        version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
        write_file(os.path.join(self.home, ".local", "lib", version, "site-packages",
                                "project.pth"), lib + "\n")
        subprocess.run(["git", "init", "-q", self.project], check=True)
        marker = os.path.join(self.root, "ran-on-host")
        payload = f"open({marker!r}, 'w').write('pwned')\\nraise ImportError\\n"
        script = (f"printf \"{payload}\" > lib/_sha2.py && "
                  "printf 'DIRC\\0\\0\\0\\2\\0\\0\\0\\0%064d' 0 > .git/index && echo planted")
        # Started as `python3 bw-claude` (as these tests and some users do), not -I -S.
        # (New: before, every module was imported at the start, none of them missing.)
        result = self.bw("--shell", "--", "-c", script)
        self.assertIn("planted", result.stdout)
        self.assertFalse(os.path.exists(marker), "code the sandbox wrote ran on the host")


class PrivateBaseTest(SessionCase):
    """private_base without tempfile: a TMPDIR that cannot be written (tempfile skipped it)."""

    PREFIX = "bw-attack-tmp-"

    def test_an_unwritable_tmpdir_is_not_where_sessions_go(self):
        env = {k: v for k, v in self.env.items() if k != "XDG_RUNTIME_DIR"}
        env["TMPDIR"] = "/proc"         # a directory nobody can make anything in
        result = self.bw("--shell", "--", "-c", "echo ran", env=env)
        self.assertIn("ran", result.stdout, result.stderr)


if __name__ == "__main__":
    unittest.main()
