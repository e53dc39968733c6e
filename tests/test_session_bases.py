"""The wrapper's own places and the host's state files, attacked from inside.

Each attack runs through the real `bw-claude --shell -- -c SCRIPT` (or bw-gemini) with HOME
pointed at a home the test builds, and each test checks the HOST side afterwards:

- the sessions' base (~/.cache/bw-claude, $XDG_CACHE_HOME/bw-claude) and the runtime base
  (XDG_RUNTIME_DIR, else the temporary directory: the proxies' sockets and LOCKS_DIR) are
  never shown, whatever link or parent leads there, and $HOME reached through a link is
  still the home (F1, F2);
- a host state file the wrapper cannot read whole is not "absent": it is never replaced,
  and one session adds at most SESSION_BACK_LIMIT bytes (F3);
- Gemini chats go back only under an id whose host directory is this project's or new (F4);
- of ~/.claude.json, no feature-gate cache, API key approval or other project's entry goes
  back (F5).
"""

import json
import os
import subprocess
import sys
import unittest

import bw_lib
from tests.test_sandbox import make_session_dirs, require_sandbox, write_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BW_CLAUDE = os.path.join(REPO, "bw-claude")
BW_GEMINI = os.path.join(REPO, "bw-gemini")
SECRET = "HOST-SECRET-5d21"
BASHRC = "# the user's bashrc\n"
BIG = bw_lib.STATE_FILE_LIMIT + (1 << 20)


class BaseCase(unittest.TestCase):
    """A temporary home, project and runtime directory; `bw` runs SCRIPT in a sandbox."""

    def setUp(self):
        require_sandbox()
        make_session_dirs(self, "bw-bases-")
        self.env = {"HOME": self.home, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                    "XDG_RUNTIME_DIR": self.runtime}

    def bw(self, script, *argv, tool=BW_CLAUDE, env=None, cwd=None):
        result = subprocess.run([sys.executable, tool, *argv, "--shell", "--", "-c", script],
                                cwd=cwd or self.project, env=env or self.env,
                                capture_output=True, text=True, timeout=120)
        self.assertNotIn("Traceback", result.stderr)
        return result

    def refused(self, result, *words):
        """The session did not start: one line saying why."""
        self.assertNotEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("ran", result.stdout)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        for word in words:
            self.assertIn(word, lines[0])

    def put(self, path, text, mode=0o600):
        return write_file(path, text, mode)

    def read(self, path):
        with open(path) as f:
            return f.read()


class WrapperPlacesAreNeverShown(BaseCase):
    """F1/F2: one session must not reach another's through the wrapper's own directories."""

    def test_a_linked_cache_directory_is_not_shown(self):
        data = os.path.join(self.root, "data", "cache")
        os.makedirs(data)
        os.symlink(data, os.path.join(self.home, ".cache"))
        planted = os.path.join(data, "bw-claude", "planted")
        result = self.bw(f"echo x > {planted} && echo ran", "--allow-rw",
                         os.path.join(self.home, ".cache"))
        self.refused(result, "bw-claude keeps its sessions' homes")
        self.assertFalse(os.path.lexists(planted))
        # The allow-file check sees the base through the same link.
        rules = self.put(os.path.join(data, "bw-claude", "rules"), "example.com\n")
        result = self.bw("true", "--dry-run", "--filter-network", "--allow-file", rules)
        self.refused(result, "which the sandbox can write")

    def test_a_parent_of_the_cache_base_is_not_shown_so_it_cannot_be_renamed(self):
        data = os.path.join(self.root, "d", "data")
        cache = os.path.join(data, "cache")
        os.makedirs(cache)
        env = {**self.env, "XDG_CACHE_HOME": cache}
        before = os.stat(cache).st_ino
        moved = os.path.join(data, "x")
        script = f"mv {cache} {moved} && mkdir -p {cache}/bw-claude && echo ran"
        result = self.bw(script, "--allow-rw", data, env=env)
        self.refused(result, "--allow-rw", "neither inside nor above it")
        self.assertFalse(os.path.lexists(moved))
        self.assertEqual(os.stat(cache).st_ino, before)
        self.assertEqual(os.listdir(cache), [])

    def test_the_runtime_base_and_its_locks_are_not_shown(self):
        """With no XDG_RUNTIME_DIR the runtime base is the temporary directory, where
        LOCKS_DIR lists the placeholders the next start removes: a forged list there would
        remove a file of another project (a live session's placeholder, or the user's)."""
        tmp = os.path.join(self.root, "tmp")
        os.mkdir(tmp, 0o700)
        env = {k: v for k, v in self.env.items() if k != "XDG_RUNTIME_DIR"}
        env["TMPDIR"] = tmp
        victim = os.path.join(tmp, "victim")
        settings = self.put(os.path.join(victim, ".claude", "settings.json"), "{}\n", 0o644)
        locks = os.path.join(tmp, bw_lib.LOCKS_DIR.format(uid=os.geteuid()))
        forge = (f"name=$(printf '%x-%x' $(stat -c '%d %i' {victim})); "
                 f"printf '%s' '{{\"root\": \"{victim}\", \"placeholders\": "
                 f"[\".claude/settings.json\"]}}' > {locks}/$name.json && echo ran")
        for argv in (["--allow-rw", tmp], ["--allow-ro", tmp], ["--dir", tmp]):
            result = self.bw(forge, *argv, env=env)
            self.refused(result, "proxy sockets and locks", "XDG_RUNTIME_DIR")
            self.assertTrue(os.path.exists(settings))
        os.mkdir(locks, 0o700)
        result = self.bw(f"ls {locks} && echo ran", "--allow-ro", locks, env=env)
        self.refused(result, "proxy sockets and locks")
        result = self.bw("echo ran", env=env)      # the next start sweeps LOCKS_DIR
        self.assertIn("ran", result.stdout, result.stderr)
        self.assertEqual(self.read(settings), "{}\n")

    def test_home_through_a_link_is_still_the_home(self):
        real = os.path.join(self.root, "realhome")
        os.rename(self.home, real)
        os.symlink(real, self.home)
        bashrc = self.put(os.path.join(real, ".bashrc"), BASHRC, 0o644)
        self.put(os.path.join(real, ".ssh", "id_ed25519"), SECRET + "\n")
        script = f"cat {real}/.ssh/id_ed25519; echo evil >> {bashrc}; echo ran"
        for cwd, argv in ((real, []), (self.project, ["--allow-ro", real])):
            result = self.bw(script, *argv, cwd=cwd)
            self.refused(result, "your home directory")
            self.assertNotIn(SECRET, result.stdout)
            self.assertEqual(self.read(bashrc), BASHRC)

    def test_full_home_access_masks_the_base_below_read_only_parents(self):
        base = os.path.join(self.home, ".cache", "bw-claude")
        other = self.put(os.path.join(base, "kept", ".claude.json"), json.dumps({"s": SECRET}))
        os.chmod(base, 0o700)
        result = self.bw(f"cat {other}; ls ~/.cache/bw-claude; "
                         f"mv ~/.cache ~/.c 2>/dev/null; echo ran", "--full-home-access")
        self.assertIn("ran", result.stdout, result.stderr)
        self.assertNotIn(SECRET, result.stdout)
        self.assertNotIn("kept", result.stdout)
        self.assertTrue(os.path.isdir(os.path.join(self.home, ".cache", "bw-claude")))

    def test_pure_decisions(self):
        place = os.path.join(self.root, "run")
        own = ("bw-locks.0", "bw-claude")
        self.assertEqual(bw_lib.place_shown(self.root, place, own), "above")
        self.assertEqual(bw_lib.place_shown(place, place, own), "above")
        for name in ("bw-locks.0", "bw-claude.ab12", ".bw-claude.ab12"):
            self.assertEqual(bw_lib.place_shown(f"{place}/{name}/x", place, own), "inside")
        self.assertIsNone(bw_lib.place_shown(f"{place}/project", place, own))
        self.assertEqual(bw_lib.place_shown(f"{place}/project", place, None), "inside")
        self.assertIsNone(bw_lib.place_shown(f"{self.root}/runner", place, own))


class LargeHostStateIsNotLost(BaseCase):
    """F3: a host file larger than STATE_FILE_LIMIT is not absent: it is never replaced."""

    def big(self, path, head):
        """A host file of BIG bytes (sparse after `head`), as two sessions appending 40 MB
        each would leave it."""
        self.put(path, head)
        os.truncate(path, BIG)
        return path

    def test_large_history_config_and_transcript_are_kept(self):
        claude = os.path.join(self.home, ".claude")
        slug = bw_lib.project_slug(self.project)
        line = json.dumps({"display": "x", "project": self.project}) + "\n"
        files = [self.big(os.path.join(claude, "history.jsonl"), line),
                 self.big(os.path.join(self.home, ".claude.json"), '{"numStartups": 1}'),
                 self.big(os.path.join(claude, "projects", slug, "t.jsonl"), '{"a": 1}\n')]
        script = (f"printf '%s\\n' '{line.strip()}' >> ~/.claude/history.jsonl; "
                  "echo '{\"numStartups\": 9}' > ~/.claude.json; "
                  f"mkdir -p ~/.claude/projects/{slug}; "
                  f"echo '{{\"b\": 2}}' >> ~/.claude/projects/{slug}/t.jsonl; echo ran")
        result = self.bw(script)
        self.assertIn("ran", result.stdout, result.stderr)
        for path in files:
            self.assertEqual(os.path.getsize(path), BIG, path)
        self.assertIn("larger than", result.stderr)

    def test_one_session_adds_at_most_the_budget(self):
        slug = bw_lib.project_slug(self.project)
        each = 40 << 20
        line = json.dumps({"a": "x" * 1014})        # 1024 bytes with its newline
        script = (f"mkdir -p ~/.claude/projects/{slug} && cd ~/.claude/projects/{slug} && "
                  f"yes '{line}' | head -c {each} > one.jsonl && cp one.jsonl two.jsonl "
                  "&& echo ran")
        result = self.bw(script)
        self.assertIn("ran", result.stdout, result.stderr)
        host = os.path.join(self.home, ".claude", "projects", slug)
        self.assertEqual(sorted(os.listdir(host)), ["one.jsonl"])
        self.assertEqual(os.path.getsize(os.path.join(host, "one.jsonl")), each)
        self.assertIn("two.jsonl: the session added more than", result.stderr)


class GeminiChatsOfOtherProjects(BaseCase):
    """F4: an existing id directory without a .project_root (Gemini's older sha256 names)
    may be another project's: it is never claimed."""

    def test_an_existing_directory_is_not_claimed(self):
        legacy = "a" * 64
        chats = os.path.join(self.home, ".gemini", "tmp", legacy, "chats")
        other = self.put(os.path.join(chats, "session-0.jsonl"), json.dumps({"s": SECRET}) + "\n")
        script = (f"mkdir -p ~/.gemini/tmp/{legacy}/chats && "
                  f"printf '%s\\n' '{self.project}' > ~/.gemini/tmp/{legacy}/.project_root && "
                  f"echo '{{\"sessionId\": \"s\"}}' > ~/.gemini/tmp/{legacy}/chats/x.jsonl && "
                  "echo ran")
        result = self.bw(script, tool=BW_GEMINI)
        self.assertIn("ran", result.stdout, result.stderr)
        self.assertIn("exists and names no project", result.stderr)
        self.assertEqual(sorted(os.listdir(os.path.dirname(chats))), ["chats"])
        self.assertEqual(os.listdir(chats), ["session-0.jsonl"])
        result = self.bw("cat ~/.gemini/tmp/*/chats/* 2>&1; echo ran", tool=BW_GEMINI)
        self.assertNotIn(SECRET, result.stdout)
        self.assertIn(SECRET, self.read(other))


class ClaudeJsonKeys(BaseCase):
    """F5: of ~/.claude.json only plain state of this project flows back."""

    def test_gates_key_approvals_and_other_projects_do_not_flow_back(self):
        other = "/home/u/other"
        config = os.path.join(self.home, ".claude.json")
        self.put(config, json.dumps({"numStartups": 1, "projects": {
            other: {"history": ["theirs"]}, self.project: {"history": []}}}))
        edit = ("import json, os; p = os.path.expanduser('~/.claude.json'); "
                "t = json.load(open(p)); t['numStartups'] = 2; "
                "t['cachedGrowthBookFeatures'] = {'gate': True}; "
                "t['cachedStatsigGates'] = {'gate': True}; "
                "t['cachedDynamicConfigs'] = {'gate': True}; "
                "t['s1mAccessCache'] = {'org': True}; "
                "t['customApiKeyResponses'] = {'approved': ['evil']}; "
                "t['cachedChangelog'] = 'notes'; "
                f"t['projects']['{other}']['history'] = ['evil']; "
                f"t['projects']['{other}']['lastCost'] = 9; "
                f"t['projects']['{self.project}']['history'] = ['mine']; "
                "json.dump(t, open(p, 'w'))")
        result = self.bw(f"python3 -c \"{edit}\" && echo ran")
        self.assertIn("ran", result.stdout, result.stderr)
        with open(config) as f:
            state = json.load(f)
        self.assertEqual(state, {"numStartups": 2, "cachedChangelog": "notes", "projects": {
            other: {"history": ["theirs"]}, self.project: {"history": ["mine"]}}})


if __name__ == "__main__":
    unittest.main()
