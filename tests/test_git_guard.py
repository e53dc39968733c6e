"""The git guard: host git must not run what a session put in a repository.  The index
parser against indexes written by real git (v2, v3, v4, split, SHA-256), the decisions, the
check on real directories, and end to end: the agent's attacks through `bw-claude --shell`,
then HOST git (status, diff, log, submodule status, commit, __git_ps1) in the project and
below, checking that the payload's marker file never appears on the host."""

import fcntl
import os
import pty
import random
import shutil
import signal
import subprocess
import unittest

import bw_lib
from tests.sandbox_harness import (BW_CLAUDE, BW_GEMINI, SessionCase, missing,
                                   processes_mentioning, read_pty, read_text, temporary_root,
                                   wait_for, write_file)

GIT = shutil.which("git")
PROMPT = "/usr/lib/git-core/git-sh-prompt"
ID = ["-c", "user.email=a@b", "-c", "user.name=a", "-c", "init.defaultBranch=m"]


def need_git():
    if not GIT:
        missing("git is not installed: apt-get install git")


def host_env(home):
    """Host git's environment in the tests: no system or user config of the machine's."""
    return {"HOME": home, "PATH": "/usr/bin:/bin", "LANG": "C", "GIT_CONFIG_NOSYSTEM": "1",
            "PAGER": "cat"}


def git(cwd, *args, env=None, check=True):
    result = subprocess.run([GIT, *ID, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=60, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {result.stderr}")
    return result


def make_repo(path, files=("a",)):
    os.makedirs(path, exist_ok=True)
    git(path, "init", "-q")
    for name in files:
        full = os.path.join(path, name)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(name + "\n")
    git(path, "add", "-A")
    git(path, "commit", "-qm", "start")
    return path


def index_of(repo):
    with open(os.path.join(repo, ".git", "index"), "rb") as f:
        return f.read()


def staged(repo):
    """{path: mode} as git ls-files --stage says."""
    out = git(repo, "ls-files", "--stage", "-z").stdout
    return {line.split("\t", 1)[1]: int(line.split()[0], 8) for line in out.split("\0") if line}


class IndexParserTest(unittest.TestCase):
    """parse_index against what real git wrote and what `git ls-files` reads from it."""

    def setUp(self):
        need_git()
        self.root = temporary_root(self, "bw-index-")
        self.sub = make_repo(os.path.join(self.root, "sub"))
        files = ["a", "dir/deep/one", "dir/deep/two", "dir/deeper/three",
                 "/".join(["z" * 200] * 3)]
        self.repo = make_repo(os.path.join(self.root, "repo"), files)
        head = git(self.sub, "rev-parse", "HEAD").stdout.strip()
        git(self.repo, "update-index", "--add", "--cacheinfo", f"160000,{head},dir/link")

    def parsed(self):
        entries, shared = bw_lib.parse_index(index_of(self.repo))
        return {os.fsdecode(p): (mode, flags, extended) for p, mode, flags, extended in entries}, shared

    def test_versions_2_3_4(self):
        for version in (2, 3, 4):
            with self.subTest(version=version):
                git(self.repo, "update-index", "--index-version", str(version))
                # git writes version 3 only when an entry needs its extended flags
                self.assertEqual(struct_version(index_of(self.repo)), 2 if version == 3 else version)
                entries, shared = self.parsed()
                self.assertIsNone(shared)
                self.assertEqual({p: e[0] for p, e in entries.items()}, staged(self.repo))
                self.assertEqual(bw_lib.gitlinks(bw_lib.parse_index(index_of(self.repo))[0]),
                                 ["dir/link"])

    def test_extended_flags_skip_worktree_and_intent_to_add(self):
        with open(os.path.join(self.repo, "new"), "w") as f:
            f.write("new\n")
        git(self.repo, "add", "-N", "new")
        git(self.repo, "update-index", "--skip-worktree", "a")
        for version in (3, 4):
            with self.subTest(version=version):
                git(self.repo, "update-index", "--index-version", str(version))
                self.assertEqual(struct_version(index_of(self.repo)), version)
                entries, _ = self.parsed()
                self.assertEqual(entries["a"][2], 0x4000)          # skip-worktree
                self.assertEqual(entries["new"][2], 0x2000)        # intent-to-add
                self.assertTrue(entries["a"][1] & 0x4000)          # extended
                self.assertEqual({p: e[0] for p, e in entries.items()}, staged(self.repo))

    def test_split_index_gitlinks_in_the_shared_part(self):
        git(self.repo, "update-index", "--split-index")
        with open(os.path.join(self.repo, "later"), "w") as f:
            f.write("later\n")
        git(self.repo, "add", "later")
        _, shared = self.parsed()
        self.assertTrue(shared)
        self.assertTrue(os.path.exists(os.path.join(self.repo, ".git", f"sharedindex.{shared}")))
        links = bw_lib.gitlink_paths(self.repo, os.path.join(self.repo, ".git", "index"))
        self.assertEqual(links, [os.path.join(self.repo, "dir/link")])

    def test_sha256_repository(self):
        repo = os.path.join(self.root, "sha256")
        os.makedirs(repo)
        if git(repo, "init", "-q", "--object-format=sha256", check=False).returncode:
            self.skipTest("this git cannot make SHA-256 repositories")
        with open(os.path.join(repo, "f"), "w") as f:
            f.write("x\n")
        git(repo, "add", "f")
        self.assertEqual(bw_lib.index_hash_size(index_of(repo)), 32)
        entries, _ = bw_lib.parse_index(index_of(repo))
        self.assertEqual([(os.fsdecode(p), m) for p, m, _, _ in entries], [("f", 0o100644)])

    def test_damaged_indexes_are_a_value_error_and_nothing_else(self):
        good = index_of(self.repo)
        rng = random.Random(11)
        cases = [b"", b"DIRC", good[:40], good[:-1], b"XXXX" + good[4:]]
        for data in cases:
            with self.subTest(size=len(data)), self.assertRaises(ValueError):
                bw_lib.parse_index(data)
        for _ in range(300):
            data = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(12, len(data))] = rng.randrange(256)
            cases.append(bytes(data))
        for data in cases:
            try:
                bw_lib.parse_index(data)
            except ValueError:
                pass


def struct_version(data):
    return int.from_bytes(data[4:8], "big")


class GitDecisionTest(unittest.TestCase):
    """The pure decisions: what is new, replaced or changed, and what is renamed."""

    def test_verdicts(self):
        vouched = {"/p/.git": ["dir", 1, 10, {}], "/p/v/.git": ["file", 1, 11, {}],
                   "/p/b": ["gitdir", 1, 12, {}], "/p/r/.git": ["dir", 1, 13, {}]}
        found = {"/p/.git": ["dir", 1, 10], "/p/v/.git": ["file", 1, 11],
                 "/p/b": ["gitdir", 1, 12], "/p/r/.git": ["dir", 1, 99],
                 "/p/new/.git": ["dir", 1, 20], "/p/f/.git": ["file", 1, 21],
                 "/p/l/.git": ["link", 1, 22], "/p/bare": ["gitdir", 1, 23]}
        changes = {"/p/.git": ["config", "hooks"], "/p/v/.git": [""], "/p/b": [""]}
        verdicts = {path: renames for path, _, renames in
                    bw_lib.git_verdicts(found, vouched, changes)}
        self.assertEqual(verdicts, {
            "/p/.git/config": ["/p/.git/config"], "/p/.git/hooks": ["/p/.git/hooks"],
            "/p/v/.git": ["/p/v/.git"],
            "/p/r/.git": ["/p/r/.git/HEAD", "/p/r/.git"],            # replaced
            "/p/new/.git": ["/p/new/.git/HEAD", "/p/new/.git"],
            "/p/f/.git": ["/p/f/.git"], "/p/l/.git": ["/p/l/.git"],
            "/p/bare": ["/p/bare/HEAD"], "/p/b": ["/p/b"]})
        self.assertEqual(bw_lib.git_verdicts(
            {"/p/.git": ["dir", 1, 10]}, {"/p/.git": ["dir", 1, 10, {}]}, {"/p/.git": []}), [])

    def test_changed_members_shallowest_first(self):
        before = {"config": [1, 5], "hooks": [2, 5], "hooks/a": [3, 5], "x": [4, 5]}
        after = {"config": [1, 5], "hooks": [2, 6], "hooks/a": [3, 6], "hooks/b": [7, 6],
                 "x": [8, 5], "modules/s/config": [9, 6]}
        self.assertEqual(bw_lib.changed_members(before, after),
                         ["hooks", "modules/s/config", "x"])

    def test_a_repository_another_live_session_made_is_not_vouched_for(self):
        mine = {"roots": ["/p"], "since": 2, "complete": True,
                "entries": {"/p/.git": ["dir", 1, 1, {"config": [5, 2]}],
                            "/p/sub/.git": ["dir", 1, 2, {}],
                            "/q/.git": ["dir", 1, 3, {}]}}
        theirs = {"roots": ["/p"], "since": 1, "complete": True,
                  "entries": {"/p/.git": ["dir", 1, 1, {"config": [5, 1]}]}}
        narrowed = bw_lib.narrowed(mine, theirs)
        self.assertEqual(narrowed["entries"], {"/p/.git": ["dir", 1, 1, {"config": [5, 1]}],
                                               "/q/.git": ["dir", 1, 3, {}]})
        self.assertIs(bw_lib.narrowed(mine, {"roots": ["/elsewhere"], "entries": {}}), mine)

    def test_git_data_and_git_directories(self):
        for name in ("objects", "index", "HEAD", "ORIG_HEAD", "BISECT_LOG", "index.lock",
                     "sharedindex.0a", "info", "logs", "refs"):
            self.assertTrue(bw_lib.git_data(name), name)
        for name in ("config", "hooks", "commondir", "config.worktree", "modules",
                     "worktrees", "gitdir", "branches", "remotes", "sequencer"):
            self.assertFalse(bw_lib.git_data(name), name)
        self.assertTrue(bw_lib.looks_like_git_dir({"HEAD", "objects", "refs"}))
        self.assertTrue(bw_lib.looks_like_git_dir({"HEAD", "commondir"}))
        self.assertFalse(bw_lib.looks_like_git_dir({"HEAD", "objects"}))


class GitCheckCase(unittest.TestCase):
    """A repository p/ of FILES in a temporary root, and a session's private directory: the
    snapshot taken at a session's start and the check made at its end, with real git and
    no sandbox."""

    FILES = ("a",)

    def setUp(self):
        need_git()
        self.root = temporary_root(self, "bw-gitcheck-")
        self.project = make_repo(os.path.join(self.root, "p"), self.FILES)
        self.private = os.path.join(self.root, "run", "bw-claude.test")
        os.makedirs(self.private)
        self.marker = os.path.join(self.root, "PWNED")

    def snapshot(self):
        bw_lib.take_git_snapshot([self.project], self.private, [os.path.dirname(self.private)])

    def check(self):
        return bw_lib.check_git(self.private, "bw-claude")


class GitCheckTest(GitCheckCase):
    """take_git_snapshot and check_git on real directories and real git, no sandbox: what
    a session may do stays, what would make host git run something is set aside."""

    FILES = ("a", "node_modules/x/i.js")

    def test_ordinary_work_is_left_alone(self):
        make_repo(os.path.join(self.project, "vendor", "lib"))
        self.snapshot()
        for path in ("hooks", "modules"):       # what the session's placeholders look like
            os.makedirs(os.path.join(self.project, ".git", path), exist_ok=True)
        with open(os.path.join(self.project, ".git", "commondir"), "wb") as f:
            f.write(bw_lib.PLACEHOLDER_COMMONDIR)
        with open(os.path.join(self.project, "b"), "w") as f:
            f.write("b\n")
        git(self.project, "add", "b")
        git(self.project, "commit", "-qm", "inside")
        git(os.path.join(self.project, "vendor", "lib"), "commit", "-q", "--allow-empty", "-m", "x")
        git(self.project, "gc", "-q")
        self.assertEqual(self.check(), "")
        self.assertFalse([n for n in os.listdir(os.path.join(self.project, ".git"))
                          if "quarantine" in n])

    def test_a_config_changed_in_an_unprotected_repository_is_set_aside(self):
        nested = make_repo(os.path.join(self.project, "node_modules", "dep"))
        self.snapshot()
        git(nested, "config", "core.fsmonitor", f"touch {self.marker}; false")
        head = git(nested, "rev-parse", "HEAD").stdout.strip()
        git(self.project, "update-index", "--add", "--cacheinfo",
            f"160000,{head},node_modules/dep")
        report = self.check()
        config = os.path.join(nested, ".git", "config")
        self.assertIn(f"{config}: changed during the session", report)
        self.assertIn(f"mv -T {config}.bw-quarantine {config}", report)
        git(self.project, "status", env=host_env(self.root))
        self.assertFalse(os.path.exists(self.marker))

    def test_a_bare_repository_that_was_there_and_a_top_that_looks_like_one(self):
        bare = os.path.join(self.project, "mirror.git")
        git(self.project, "clone", "-q", "--bare", ".", bare)
        for name in ("HEAD", "objects/x", "refs/y", "notes.txt"):   # project files
            os.makedirs(os.path.dirname(os.path.join(self.project, name)), exist_ok=True)
            open(os.path.join(self.project, name), "w").close()
        self.snapshot()
        with open(os.path.join(self.project, "notes.txt"), "w") as f:
            f.write("edited\n")
        git(bare, "config", "core.fsmonitor", f"touch {self.marker}; false")
        report = self.check()
        self.assertIn(f"{bare}/config: changed during the session", report)
        self.assertNotIn("notes.txt", report)
        self.assertNotIn(f"{self.project}/HEAD", report)

    def test_a_repository_made_unreadable_is_set_aside(self):
        if os.geteuid() == 0:
            self.skipTest("root reads a directory of mode 000")
        nested = make_repo(os.path.join(self.project, "node_modules", "dep"))
        self.snapshot()
        git(nested, "config", "core.fsmonitor", f"touch {self.marker}; false")
        os.chmod(os.path.join(nested, ".git"), 0)
        self.addCleanup(lambda: os.path.isdir(os.path.join(nested, ".git.bw-quarantine")) and
                        os.chmod(os.path.join(nested, ".git.bw-quarantine"), 0o700))
        self.assertIn(f"{nested}/.git: changed during the session", self.check())
        self.assertFalse(os.path.lexists(os.path.join(nested, ".git")))

    def test_a_repository_made_while_another_session_lives_stays_new_for_it(self):
        """Session A makes sub/.git; B starts; A ends and sets it aside; B's agent puts it
        back.  B's end must set it aside again."""
        other = os.path.join(self.root, "run", "bw-gemini.other")
        os.makedirs(other)
        bw_lib.take_git_snapshot([self.project], other)               # A starts
        holder = os.open(other, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, holder)
        fcntl.flock(holder, fcntl.LOCK_EX)                            # A lives
        sub = make_repo(os.path.join(self.project, "sub"))            # A's agent
        git(sub, "config", "core.fsmonitor", f"touch {self.marker}; false")
        self.snapshot()                                               # B starts
        os.rename(os.path.join(sub, ".git"), os.path.join(sub, ".git.x"))   # A's end
        os.rename(os.path.join(sub, ".git.x"), os.path.join(sub, ".git"))   # B's agent
        self.assertIn(f"{sub}/.git: a repository made during the session", self.check())

    def test_a_damaged_index_is_said_and_the_rest_still_checked(self):
        self.snapshot()
        with open(os.path.join(self.project, ".git", "index"), "r+b") as f:
            f.seek(8)
            f.write(b"\x00\x00\x03\xe8")          # 1000 entries: more than there are
        make_repo(os.path.join(self.project, "new"))
        report = self.check()
        self.assertIn("index does not parse", report)
        self.assertIn("new/.git: a repository made during the session", report)

    def test_a_cut_short_search_sees_shallow_repositories_first(self):
        for n in range(20):
            os.makedirs(os.path.join(self.project, "node_modules", f"p{n}", "lib", "x"))
        os.makedirs(os.path.join(self.project, "zz", ".git"))
        found, complete = bw_lib.find_git_entries([self.project], limit=40)
        self.assertFalse(complete)
        self.assertIn(os.path.join(self.project, "zz", ".git"), found)

    def cut_the_search_short(self):
        """30 directories, and a search that stops after 10 entries."""
        for n in range(30):
            os.makedirs(os.path.join(self.project, f"d{n}"))
        limit = bw_lib.GIT_CHECK_ENTRIES
        bw_lib.GIT_CHECK_ENTRIES = 10
        self.addCleanup(setattr, bw_lib, "GIT_CHECK_ENTRIES", limit)

    def test_a_gitlink_beyond_a_cut_short_search_is_still_checked(self):
        self.cut_the_search_short()
        self.snapshot()
        sub = make_repo(os.path.join(self.project, "zz", "deep", "sub"))
        git(sub, "config", "core.fsmonitor", f"touch {self.marker}; false")
        head = git(sub, "rev-parse", "HEAD").stdout.strip()
        git(self.project, "update-index", "--add", "--cacheinfo", f"160000,{head},zz/deep/sub")
        report = self.check()
        self.assertIn(f"{sub}/.git: a repository made during the session", report)
        self.assertIn("WARNING: the search stopped", report)
        git(self.project, "status", env=host_env(self.root))
        self.assertFalse(os.path.exists(self.marker))

    def test_a_cut_short_search_is_said_loudly(self):
        self.cut_the_search_short()
        self.snapshot()
        report = self.check()
        self.assertIn("WARNING: the search stopped after 10 entries", report)


class GitDataWrittenThroughTest(GitCheckCase):
    """Git's data (reflogs, refs, COMMIT_EDITMSG, FETCH_HEAD, objects/...) configures
    nothing, but host git writes it: a symlink, a hard link or a fifo the session put
    there would make host git write a host file.  Set aside; then HOST git writes, and
    the host file is unchanged."""

    FILES = ("a", "notes")

    def setUp(self):
        super().setUp()
        self.git_dir = os.path.join(self.project, ".git")
        self.bashrc = write_file(os.path.join(self.root, "bashrc"), "# the user's\n")

    def link(self, relative, target):
        path = os.path.join(self.git_dir, relative)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)
        return path

    def host_git(self):
        """What the user does next on the host: switch branch, fetch, commit, merge."""
        env = host_env(self.root)
        for args in (["checkout", "-q", "m"], ["checkout", "-q", "-b", "host"],
                     ["fetch", "-q", ".", "m"], ["commit", "-q", "--allow-empty", "-m", "h"],
                     ["merge", "-q", "--squash", "m"], ["tag", "-a", "-m", "t", "t1"]):
            subprocess.run([GIT, *ID, *args], cwd=self.project, env=env, capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL)

    def assert_bashrc_untouched(self):
        self.assertEqual(read_text(self.bashrc), "# the user's\n")
        subprocess.run(["bash", "-c", f". {self.bashrc}"], capture_output=True, timeout=30)
        self.assertFalse(os.path.exists(self.marker))

    def test_the_attack_works_without_the_check(self):
        """The control: the same links, no check, and host git writes the host file."""
        git(self.project, "checkout", "-q", "-b", f"wip;touch${{IFS}}{self.marker};#")
        self.link("logs/HEAD", self.bashrc)
        self.host_git()
        subprocess.run(["bash", "-c", f". {self.bashrc}"], capture_output=True, timeout=30)
        self.assertTrue(os.path.exists(self.marker))

    def test_a_reflog_linked_to_a_host_file(self):
        self.snapshot()
        git(self.project, "checkout", "-q", "-b", f"wip;touch${{IFS}}{self.marker};#")
        head = self.link("logs/HEAD", self.bashrc)
        branch = self.link("logs/refs/heads/m", self.bashrc)
        report = self.check()
        for path in (head, branch):
            self.assertIn(f"{path}: changed during the session", report)
            self.assertIn(f"mv -T {path}.bw-quarantine {path}", report)
        self.host_git()
        self.assert_bashrc_untouched()

    def test_state_files_git_opens_for_writing(self):
        self.snapshot()
        names = ("FETCH_HEAD", "COMMIT_EDITMSG", "SQUASH_MSG", "MERGE_MSG", "TAG_EDITMSG",
                 "ORIG_HEAD", "packed-refs", "index.lock")
        for name in names:
            self.link(name, self.bashrc)
        report = self.check()
        for name in names:
            self.assertIn(f"{self.git_dir}/{name}: changed during the session", report)
        self.host_git()
        self.assert_bashrc_untouched()

    def test_symlinked_directories_in_the_data(self):
        """refs/heads, logs/refs/heads, objects/ab, objects/info, objects/pack/..., info,
        rr-cache: host git would make files in a host directory."""
        host_dir = os.path.join(self.root, "autostart")
        os.makedirs(host_dir)
        self.snapshot()
        links = [self.link("logs/refs/heads", host_dir), self.link("info", host_dir),
                 self.link("rr-cache", host_dir), self.link("objects/info", host_dir),
                 self.link("objects/pack/multi-pack-index", self.bashrc)]
        links += [self.link(f"objects/{n:02x}", host_dir) for n in range(256)
                  if not os.path.isdir(os.path.join(self.git_dir, "objects", f"{n:02x}"))]
        report = self.check()
        for path in links:
            self.assertIn(f"{path}: changed during the session", report)
        with open(os.path.join(self.project, "new"), "w") as f:
            f.write("new\n")
        git(self.project, "add", "new", env=host_env(self.root))
        self.host_git()
        self.assertEqual(os.listdir(host_dir), [])
        self.assert_bashrc_untouched()

    def test_a_hard_linked_reflog_and_a_fifo(self):
        """logs/HEAD another name of a project file (a reflog line lands in it after the
        user reviewed the session's changes); FETCH_HEAD a fifo (host git hangs)."""
        notes = os.path.join(self.project, "notes")
        before = read_text(notes)
        self.snapshot()
        head = os.path.join(self.git_dir, "logs", "HEAD")
        os.unlink(head)
        os.link(notes, head)
        os.mkfifo(os.path.join(self.git_dir, "FETCH_HEAD"))
        report = self.check()
        self.assertIn(f"{head}: changed during the session", report)
        self.assertIn(f"{self.git_dir}/FETCH_HEAD: changed during the session", report)
        self.host_git()
        self.assertEqual(read_text(notes), before)

    def test_an_unlistable_reflog_directory_hiding_a_symlink(self):
        if os.geteuid() == 0:
            self.skipTest("root lists a directory of mode 311")
        self.snapshot()
        heads = os.path.join(self.git_dir, "logs", "refs", "heads")
        self.link("logs/refs/heads/m", self.bashrc)
        os.chmod(heads, 0o311)
        self.addCleanup(lambda: [os.chmod(os.path.join(self.git_dir, "logs", "refs", n), 0o700)
                                 for n in os.listdir(os.path.join(self.git_dir, "logs", "refs"))])
        self.assertIn(f"{heads}: changed during the session", self.check())
        self.host_git()
        self.assert_bashrc_untouched()

    def test_what_was_there_at_start_and_ordinary_work_are_left_alone(self):
        """Links the user made (git-new-workdir style), a --local clone's hard-linked
        objects, and git's own work in the session: nothing reported."""
        exclude = os.path.join(self.root, "exclude")
        open(exclude, "w").close()
        self.link("info/exclude", exclude)
        clone = os.path.join(self.project, "vendor", "clone")
        git(self.project, "clone", "-q", "--local", ".", clone)
        self.snapshot()
        git(self.project, "checkout", "-q", "-b", "feature")
        git(self.project, "commit", "-q", "--allow-empty", "-m", "x")
        git(self.project, "fetch", "-q", ".", "m")
        git(self.project, "tag", "-a", "-m", "t", "t2")
        git(clone, "commit", "-q", "--allow-empty", "-m", "y")
        git(clone, "gc", "-q")
        self.assertEqual(self.check(), "")


class GitUnreadableTest(GitCheckCase):
    """A directory the user cannot list hides what is in it from the check, not from
    host git (mode 311: git enters a name it knows).  On directories: unprivileged only,
    root lists everything."""

    def unhide(self, path):
        """Mode 311 on `path`, undone after the test; skipped as root, who lists it."""
        if os.geteuid() == 0:
            self.skipTest("root lists a directory of mode 311")
        os.chmod(path, 0o311)
        self.addCleanup(lambda: os.path.isdir(path) and os.chmod(path, 0o700))

    def test_the_warning_names_a_few(self):
        names = [f"/p/d{n}" for n in range(8)]
        problems = bw_lib.git_walk_problems(False, names)
        self.assertEqual(len(problems), 1)
        self.assertIn("/p/d0, /p/d1, /p/d2, /p/d3, /p/d4 and 3 more directories", problems[0])
        self.assertNotIn("/p/d5", problems[0])
        self.assertEqual(len(bw_lib.git_walk_problems(True, names)), 2)
        self.assertEqual(bw_lib.git_walk_problems(False, []), [])

    def test_a_repository_below_an_unlistable_directory_is_warned_about(self):
        bw_lib.take_git_snapshot([self.project], self.private)
        vault = os.path.join(self.project, "build", "vault")
        sub = make_repo(os.path.join(vault, "sub"))
        git(sub, "config", "core.fsmonitor", f"touch {self.marker}; false")
        self.unhide(vault)
        unreadable = []
        self.assertFalse(bw_lib.find_git_entries([self.project], unreadable=unreadable)[1])
        self.assertEqual(unreadable, [vault])
        report = self.check()
        self.assertIn(f"WARNING: the search could not read {vault}", report)
        self.assertIn("host git still enters them", report)

    def test_a_hooks_directory_made_unlistable_is_set_aside(self):
        nested = make_repo(os.path.join(self.project, "sub"))
        bw_lib.take_git_snapshot([self.project], self.private)
        hooks = os.path.join(nested, ".git", "hooks")
        with open(os.path.join(hooks, "pre-commit"), "w") as f:
            f.write(f"#!/bin/sh\ntouch {self.marker}\n")
        os.chmod(os.path.join(hooks, "pre-commit"), 0o755)
        self.unhide(hooks)
        self.addCleanup(lambda: os.path.isdir(hooks + ".bw-quarantine") and
                        os.chmod(hooks + ".bw-quarantine", 0o700))
        self.assertIn(f"{hooks}: changed during the session", self.check())
        git(nested, "commit", "-q", "--allow-empty", "-m", "host", env=host_env(self.root))
        self.assertFalse(os.path.exists(self.marker))


class GitDataSandboxTest(SessionCase):
    """Git's data turned against host git, through `bw-claude --shell`: a branch named
    like a command, .git/logs/HEAD, FETCH_HEAD and COMMIT_EDITMSG linked to the host's
    ~/.bashrc; then host git switches branch, fetches and commits, and bash reads
    ~/.bashrc."""

    PREFIX = "bw-gitdata-"
    TOOLS = ("git",)

    def setUp(self):
        super().setUp()
        self.marker = os.path.join(self.root, "PWNED")
        self.bashrc = self.write_home(".bashrc", "# the user's\n")
        make_repo(self.project, ["a"])
        self.script = (f'git checkout -q -b "wip;touch\\${{IFS}}{self.marker};#" && '
                       f"rm .git/logs/HEAD && ln -s {self.bashrc} .git/logs/HEAD && "
                       f"ln -sf {self.bashrc} .git/FETCH_HEAD && "
                       f"ln -sf {self.bashrc} .git/COMMIT_EDITMSG && echo ATTACKED")

    def host_git_then_bash(self):
        """Each host git command, then a new shell reads ~/.bashrc: whether the marker
        appeared, and whether ~/.bashrc changed."""
        env, changed = host_env(self.home), False
        for args in (["checkout", "-q", "m"], ["fetch", "-q", ".", "m"],
                     ["commit", "-q", "--allow-empty", "-m", "host"]):
            subprocess.run([GIT, *ID, *args], cwd=self.project, env=env, capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL)
            subprocess.run(["bash", "-c", f". {self.bashrc}"], env=env, capture_output=True,
                           timeout=30)
            changed = changed or read_text(self.bashrc) != "# the user's\n"
        return os.path.exists(self.marker), changed

    def test_the_attack_works_without_the_guard(self):
        result = self.shell(self.script, "--allow-config-writes", code=0)
        self.assertIn("ATTACKED", result.stdout)
        self.assertEqual(self.host_git_then_bash(), (True, True))

    def test_links_in_git_data_are_set_aside(self):
        result = self.shell(self.script, code=0)
        self.assertIn("ATTACKED", result.stdout)
        git_dir = os.path.join(self.project, ".git")
        for name in ("logs/HEAD", "FETCH_HEAD", "COMMIT_EDITMSG"):
            self.assertIn(f"{git_dir}/{name}: changed during the session", result.stderr)
        self.assertEqual(self.host_git_then_bash(), (False, False),
                         "host git wrote to ~/.bashrc through the session's links")


class GitGuardSandboxTest(SessionCase):
    """The attacks through `bw-claude --shell`, then host git where a user would run it."""

    PREFIX = "bw-gitguard-"
    TOOLS = ("git",)

    def setUp(self):
        super().setUp()
        self.marker = os.path.join(self.root, "PWNED")
        self.payload = f"touch {self.marker}; false"

    def project_repo(self):
        make_repo(self.project, ["a", "src/b"])

    def host_git(self, *directories):
        """What a user does on the host after the session: status, diff (the prompt), log
        through a pager, submodule status, a commit, and bash's __git_ps1."""
        env = host_env(self.home)
        for directory in directories or (self.project,):
            for args in (["status"], ["diff", "--quiet"], ["submodule", "status"],
                         ["commit", "-q", "--allow-empty", "-m", "host"]):
                subprocess.run([GIT, *ID, *args], cwd=directory, env=env, capture_output=True,
                               timeout=60)
            # git log on a terminal, so that it starts the pager
            controller, terminal = pty.openpty()
            try:
                subprocess.run([GIT, "log", "-1"], cwd=directory, env=env, timeout=60,
                               stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
            finally:
                os.close(terminal)
                read_pty(controller, rounds=20)
                os.close(controller)
            if os.path.exists(PROMPT):
                prompt = (f". {PROMPT}; GIT_PS1_SHOWDIRTYSTATE=1 GIT_PS1_SHOWUNTRACKEDFILES=1 "
                          "GIT_PS1_SHOWSTASHSTATE=1 GIT_PS1_SHOWUPSTREAM=auto; __git_ps1")
                subprocess.run(["bash", "-c", prompt], cwd=directory, env=env,
                               capture_output=True, timeout=60)
        return os.path.exists(self.marker)

    def assert_host_git_runs_nothing(self, *directories):
        self.assertFalse(self.host_git(*directories), "host git ran the session's payload")

    def nested_attack(self, where):
        return (f"git init -q {where} && echo x > {where}/f && git -C {where} add f && "
                f"git -C {where} {' '.join(ID)} commit -qm x && "
                f"git -C {where} config core.fsmonitor '{self.payload}' && "
                f"git -C {where} config core.pager '{self.payload}; cat' && "
                f"git -C {where} config core.hooksPath hooks && mkdir -p {where}/hooks && "
                f"printf '#!/bin/sh\\n{self.payload}\\n' > {where}/hooks/pre-commit && "
                f"chmod +x {where}/hooks/pre-commit && "
                f"git update-index --add --cacheinfo 160000,$(git -C {where} rev-parse HEAD),{where}"
                " && echo ATTACKED")

    def test_the_attack_works_without_the_guard(self):
        """The control: with --allow-config-writes (no protection, no guard) the attack
        reaches the host, so the tests below that see no marker mean something."""
        self.project_repo()
        result = self.shell(self.nested_attack("sub"), "--allow-config-writes", code=0)
        self.assertIn("ATTACKED", result.stdout)
        self.assertTrue(self.host_git())

    def test_a_gitlink_to_a_repository_made_inside(self):
        self.project_repo()
        result = self.shell(self.nested_attack("sub"), code=0)
        self.assertIn("ATTACKED", result.stdout)
        self.assert_host_git_runs_nothing(self.project, os.path.join(self.project, "sub"),
                                          os.path.join(self.project, "src"))
        self.assertIn("sub/.git: a repository made during the session", result.stderr)
        self.assertIn("to undo:", result.stderr)
        self.assertTrue(os.path.isdir(os.path.join(self.project, "sub", ".git.bw-quarantine")))

    def test_nested_deep_and_in_an_ignored_directory(self):
        self.project_repo()
        with open(os.path.join(self.project, ".gitignore"), "w") as f:
            f.write("node_modules/\n")
        deep = "/".join(f"d{n}" for n in range(12)) + "/sub"
        ignored = "node_modules/pkg"
        result = self.shell(self.nested_attack(deep) + " && " + self.nested_attack(ignored), code=0)
        self.assertEqual(result.stdout.count("ATTACKED"), 2)
        self.assert_host_git_runs_nothing(self.project, os.path.join(self.project, deep),
                                          os.path.join(self.project, ignored),
                                          os.path.join(self.project, deep, ".."))

    def test_a_git_file_pointing_at_a_crafted_git_directory(self):
        """sub/.git is a file: `gitdir:` a directory the agent filled, in the project or in
        the CLI's state (outside the project)."""
        self.project_repo()
        script = ""
        for name, made, gitdir in (("sub", ".stash", "../.stash"),
                                   ("other", f"{self.home}/.claude/evil", f"{self.home}/.claude/evil")):
            script += (f"git init -q --bare {made} && git -C {made} config core.bare false && "
                       f"git -C {made} config core.fsmonitor '{self.payload}' && "
                       f"mkdir -p {name} && echo 'gitdir: {gitdir}' > {name}/.git && "
                       f"git update-index --add --cacheinfo 160000,{'1' * 40},{name} && "
                       "echo ATTACKED; ")
        result = self.shell(script, code=0)
        self.assertEqual(result.stdout.count("ATTACKED"), 2)
        self.assert_host_git_runs_nothing(self.project, os.path.join(self.project, "sub"),
                                          os.path.join(self.project, "other"),
                                          os.path.join(self.project, ".stash"))
        self.assertIn("sub/.git: a .git file (gitdir: pointer) made", result.stderr)
        self.assertIn("other/.git: a .git file (gitdir: pointer) made", result.stderr)
        self.assertIn(".stash: a git directory made", result.stderr)

    def test_a_hand_made_linked_worktree(self):
        """w/.git names a worktree git directory whose commondir is a crafted repository."""
        self.project_repo()
        result = self.shell(
            "git init -q --bare .common && git -C .common config core.bare false && "
            f"git -C .common config core.fsmonitor '{self.payload}' && mkdir -p .wt w && "
            "echo 'ref: refs/heads/m' > .wt/HEAD && echo ../.common > .wt/commondir && "
            'echo "$PWD/w/.git" > .wt/gitdir && echo "gitdir: $PWD/.wt" > w/.git && '
            "git -C w status >/dev/null && echo ATTACKED", code=0)
        self.assertIn("ATTACKED", result.stdout)
        self.assert_host_git_runs_nothing(os.path.join(self.project, "w"))
        self.assertIn("w/.git: a .git file (gitdir: pointer) made", result.stderr)

    def test_git_init_at_the_top_of_a_project_that_was_not_a_repository(self):
        result = self.shell(self.nested_attack("sub").replace(
            "git update-index", "true") + f" && git init -q . && "
            f"git config core.fsmonitor '{self.payload}' && git config core.pager "
            f"'{self.payload}; cat' && echo TOP", code=0)
        self.assertIn("TOP", result.stdout)
        self.assert_host_git_runs_nothing(self.project, os.path.join(self.project, "sub"))
        self.assertIn(f"{self.project}/.git: a repository made during the session", result.stderr)

    def test_a_bare_repository_planted_below(self):
        self.project_repo()
        result = self.shell("git clone -q --bare . tools/x.git && cd tools/x.git && "
                            "git config core.bare false && git config core.worktree ../.. && "
                            f"git config core.fsmonitor '{self.payload}' && echo ATTACKED", code=0)
        self.assertIn("ATTACKED", result.stdout)
        self.assert_host_git_runs_nothing(os.path.join(self.project, "tools", "x.git"))

    def test_a_project_top_that_looks_like_a_git_directory_hides_nothing(self):
        self.project_repo()
        unlinked = self.nested_attack("other").replace("git update-index", "true")
        result = self.shell("touch HEAD && mkdir objects refs && " + unlinked, code=0)
        self.assertIn("ATTACKED", result.stdout)
        self.assert_host_git_runs_nothing(self.project, os.path.join(self.project, "other"))

    def test_ordinary_git_work_inside_is_not_touched(self):
        self.project_repo()
        result = self.shell(f"echo c > c && git add c && git {' '.join(ID)} commit -qm c && "
                            "git stash list && git gc -q && echo DONE", code=0)
        self.assertIn("DONE", result.stdout)
        self.assertNotIn("bw-claude: git:", result.stderr)
        self.assertFalse([n for n in os.listdir(os.path.join(self.project, ".git"))
                          if "quarantine" in n])
        self.assertEqual(git(self.project, "log", "--format=%s", "-1").stdout, "c\n")

    def test_undo_puts_a_wanted_repository_back(self):
        result = self.shell("git init -q . && echo x > f && git add f && "
                            f"git {' '.join(ID)} commit -qm wanted", code=0)
        self.assertFalse(os.path.exists(os.path.join(self.project, ".git")))
        undo = [line.split("git:", 1)[1].strip() for line in result.stderr.splitlines()
                if "mv -T" in line]
        self.assertEqual(len(undo), 1, result.stderr)
        subprocess.run(["sh", "-c", undo[0]], check=True, timeout=30)
        self.assertEqual(git(self.project, "log", "--format=%s").stdout, "wanted\n")

    def test_an_allow_rw_directory(self):
        other = make_repo(os.path.join(self.root, "other"))
        result = self.shell(f"cd {other} && " + self.nested_attack("sub"), "--allow-rw", other, code=0)
        self.assertIn("ATTACKED", result.stdout)
        self.assert_host_git_runs_nothing(other, os.path.join(other, "sub"))
        self.assertIn(f"{other}/sub/.git: a repository made during the session", result.stderr)

    def wait_in_sandbox(self, name):
        return (f"i=0; while [ ! -e {name} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); "
                "done; ")

    def start(self, script):
        return self.popen("--shell", "--", "-c", script)

    def test_overlapping_sessions_one_puts_back_what_the_other_set_aside(self):
        """A makes sub/.git and waits; B starts (sub/.git is there, protected for B); A
        ends and sets it aside; B's agent puts it back (by rename if it can, else as a
        copy).  B's end sets it aside again."""
        self.project_repo()
        a = self.start(self.nested_attack("sub") + " && touch a-made; " +
                       self.wait_in_sandbox("a-go"))
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.project, "a-made")), 60))
        b = self.start("touch b-started; " + self.wait_in_sandbox("b-go") +
                       "{ mv sub/.git.bw-quarantine sub/.git || cp -a sub/.git.bw-quarantine "
                       "sub/.git; } && mv sub/.git/HEAD.bw-quarantine sub/.git/HEAD && "
                       "echo PUT-BACK")
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.project, "b-started")),
                                 60))
        open(os.path.join(self.project, "a-go"), "w").close()
        _, a_err = a.communicate(timeout=60)
        self.assert_host_git_runs_nothing(self.project, os.path.join(self.project, "sub"))
        self.assertIn("sub/.git: a repository made during the session", a_err)
        open(os.path.join(self.project, "b-go"), "w").close()
        b_out, b_err = b.communicate(timeout=60)
        self.assertIn("PUT-BACK", b_out, b_err)
        self.assert_host_git_runs_nothing(self.project, os.path.join(self.project, "sub"))
        self.assertIn("sub/.git: a repository made during the session", b_err)

    def kill_9_then_start(self, killed_tool):
        """A session of `killed_tool` attacks and is killed with SIGKILL; then bw-claude
        starts in the project."""
        self.project_repo()
        done = os.path.join(self.project, "attack-done")
        script = (self.nested_attack("sub") + " && touch attack-done; " +
                  self.wait_in_sandbox("never"))
        process = self.popen("--shell", "--", "-c", script, tool=killed_tool)
        self.assertTrue(wait_for(lambda: os.path.exists(done), 60))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
        self.assertTrue(wait_for(lambda: not processes_mentioning(self.runtime)))
        result = self.shell("true", code=0)
        self.assert_host_git_runs_nothing(self.project, os.path.join(self.project, "sub"))
        self.assertIn("a session that was killed", result.stderr)
        self.assertIn("sub/.git: a repository made during the session", result.stderr)
        return result

    def test_kill_9_then_the_next_start(self):
        self.kill_9_then_start(BW_CLAUDE)
        self.assertEqual(os.listdir(self.runtime), [])

    def test_kill_9_of_the_other_wrapper_then_a_start(self):
        self.kill_9_then_start(BW_GEMINI)
        # bw-gemini's sweep removes its directory; the check is not made twice
        result = self.shell("true", tool=BW_GEMINI, code=0)
        self.assertNotIn("git:", result.stderr)
        self.assertEqual(os.listdir(self.runtime), [])

if __name__ == "__main__":
    unittest.main()
