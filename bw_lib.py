"""Run an AI coding CLI inside a bubblewrap sandbox, optionally with filtered network.

This module is the whole of bw-claude and bw-gemini; the two entry scripts only pick
a profile and call main().  Python 3.11 standard library only.

What the sandbox sees
    /usr, /bin, /sbin, /lib*, /opt   read-only, laid out as on the host
    /etc                             only what name resolution, TLS, users, locale,
                                     time zone and /etc/alternatives need
    /dev, /proc                      fresh and minimal
    /tmp, /var/tmp                   private, empty, gone when the session ends
    $HOME                            a private, empty directory for this session, with:
        the CLI's state (~/.claude/, ~/.gemini/)                 read-write, except
            what holds code it runs later (PROTECTED_HOME, below)
        tool directories (.cargo, .nvm, .local/bin, .gitconfig...)  read-only
        the CLI's install, wherever it is                        read-only
    the project directory (--dir)    read-write, the working directory
  Never visible: ~/.ssh, ~/.aws, ~/.gnupg, ~/.kube, ~/.docker, ~/.netrc,
  ~/.password-store, browser profiles, ~/.config/gh, shell histories and the other
  SECRETS below, nor the other CLI's state (its credentials), not even with
  --full-home-access; a secret that is a symlink is hidden at its real path too.
  Nothing from /run, $XDG_RUNTIME_DIR or the host's /tmp, so no host unix socket
  (ssh-agent, D-Bus, docker.sock) is reachable; a socket below a directory that
  --full-home-access, --allow-ro or --allow-rw shows is covered by /dev/null (found by a
  bounded search: SOCKET_WALK_*; --verbose says when it was cut short).
  Namespaces: user, pid, ipc, uts, cgroup (and net with --unshare-net); no nested user
  namespaces (--disable-userns, bubblewrap >= 0.8); all capabilities dropped; a seccomp
  filter makes ioctl(TIOCSTI) and ioctl(TIOCLINUX) fail, so nothing inside can type
  into the user's shell through the shared terminal; only stdin, stdout and stderr are
  inherited; the sandbox dies with the wrapper.  The environment is rebuilt from an
  allow list (ENV_NAMES and the profile's own), then --pass-env, then --env; it reaches
  bwrap as its environment, never on its command line, so `ps` shows no API key.

Files that run code later, outside the sandbox
  .git/hooks, .git/config, .git/commondir, .git/config.worktree, .git/modules,
  .git/worktrees (or .git itself when it is a file), .claude/settings*.json,
  .claude/commands, agents, hooks, skills, .mcp.json, .gemini/settings.json, .env,
  commands, extensions, .vscode, .idea in the project and in every --allow-rw
  directory; and in the CLI's state ~/.claude/settings*.json, hooks, plugins, skills,
  local (the local install), commands, agents, scripts at its top (*.sh, executables),
  ~/.gemini/settings.json, .env, extensions, commands, trustedFolders.json: all stay
  read-only although their parent is writable (PROTECTED_*).  A missing one is held by
  an empty placeholder ({} for .json, "." for commondir) for the session, removed at
  exit, so it cannot be created; the directories between it and the project are bound
  onto themselves, so `mv .git elsewhere` fails (a mount point cannot be renamed).  A
  placeholder that cannot be made where the sandbox could make the file (a directory
  of ours, mode 555) stops the session: protection is never dropped silently.  The
  CLI's home settings files are the exception it needs: the sandbox gets a copy, and at
  exit only changes to the profile's `guarded` keys (model, the accepted
  bypass-permissions prompt, Gemini's trust for this project...) go back; hooks, env,
  permissions and helpers never do.  --allow-config-writes turns all of this off.
  Not contained: a new repository (git init, a clone, a submodule) made inside the
  project or an --allow-rw directory, and repositories nested below their top; files
  of the project itself (.env, Makefile, package.json scripts...) that tools run.

~/.claude.json
  Claude writes it with a temporary file, rename() and a lock directory, all beside
  the file in $HOME.  rename() onto a single-file bind mount fails (EBUSY), so the
  file is not bound: it is copied into the session's home at start (a symlink is
  followed on the host) and, if the CLI changed it, only the changes to
  CLAUDE_JSON_KEYS (counters, onboarding, caches, project history and statistics, the
  trust answered for this project) are written back at exit under Claude's own lock,
  merged key by key with any change another Claude made to the host's copy meanwhile.
  MCP servers, allowed tools, env, apiKeyHelper and trust for other folders never go
  back.

--filter-network
  A private directory (mode 0700, under $XDG_RUNTIME_DIR when set) holds the unix
  socket of socks_filter.py, started for this session with the profile's allow list.
  The socket is bound into the sandbox, and socat_bridge.sh, the sandbox's first
  process, forwards 127.0.0.1:PORT (a port the kernel picks) to it, sets
  HTTP(S)_PROXY, ALL_PROXY and NO_PROXY, then execs the CLI.  --filter-network implies
  --unshare-net, so the sandbox has no other way out.  --filter-network --share-net is
  advisory (said at start): programs that ignore proxy variables go around the filter,
  and the bridge listens on the host's 127.0.0.1, open to every local user, so the proxy
  then serves only clients that send a random per-session password (TOKEN_VARIABLE, in
  the environment of the proxy and the bridge, never on a command line), which the
  bridge puts in the proxy URLs (http://bw:TOKEN@127.0.0.1:PORT).  --host-port PORT[:HOST]
  makes the host's 127.0.0.1:HOST appear at 127.0.0.1:PORT inside: one more socat in the
  bridge asks the proxy for it, which allows exactly that IP rule and logs it.  At exit
  the proxy is stopped, the directory removed, and the summary below is printed.
  The private directory exists for every session (it holds the session's home) and is
  locked while the session lives; a run after one killed with SIGKILL removes it.

The allow list
  The profile's API hosts, then --allow-preset lists, --allow-domain rules,
  ~/.config/TOOL/allowed-domains and --allow-file files (one rule a line, # comments).
  The rule syntax is socks_filter.py's: example.com, *.example.com, 1.2.3.4,
  10.0.0.0/8, [::1], each with an optional :PORT; the profiles' rules name port 443.  A
  name rule carries TLS for that name only (a tunnel must open with a ClientHello naming
  it); host:PORT/raw carries any protocol to that port.  Names pass only by name rules, IP
  addresses only by IP rules, and no name may lead to a loopback or private address
  unless an IP rule names it or --allow-private (dangerous: your LAN, the cloud
  metadata service, every service on this machine) is given.  Presets (PRESETS, a
  plain dict; --list-presets prints them as an allow file) name hosts, never wildcards
  over hosts that serve anyone's content.

When something is blocked
  The summary at exit lists each blocked host:port once: how many times, why in words
  (not in allow list, private address, TLS name differs from the requested host...)
  and the option that would allow it, when one would: `--allow-domain host:port`.  A
  private address (loopback, the LAN, the cloud metadata service) is flagged "allow only
  if you mean it", and a name that resolved to one is not offered --allow-private: that
  is for the user to decide.
  A name that resolved to a private address is offered the IP rule for that address
  (only if you mean it) or --allow-private; a tunnel that was not TLS, a :PORT/raw rule.
  Allowed connections whose lookup or connect failed are counted apart, with the reason;
  the hosts the profile expects to stay blocked (expected_blocked), and clients refused
  for lacking the advisory bridge's password, are summed up on one line each.
  On a terminal wide enough it is a small table; otherwise one line (a pipe, a file), or
  on a narrow terminal that line folded between words.
  It is built from the proxy's JSON log alone (summarize()), so --proxy-log FILE keeps
  what it takes to rebuild it.

--learn FILE
  Runs the session with the proxy in audit mode: every destination that passes the
  name and address checks goes through (private addresses stay blocked unless
  --allow-private), and enforce mode's verdict is logged.  A loud line says so at
  start.  At exit FILE is replaced by the destinations the session reached, as
  host:port rules (host:port/raw where a tunnel carried something other than TLS for
  that name), sorted, each with a comment giving its connections and protocols;
  what failed to connect, and names that cannot be rules (a single label such as
  localhost), stay comments.  Review it, then run with --filter-network --unshare-net
  --allow-file FILE.  Learn implies --filter-network and --unshare-net (--share-net
  still wins), so the session learns exactly the way out an enforced session has.

Defaults file
  ~/.config/TOOL/options (under $XDG_CONFIG_HOME when set): each line holds options,
  split like a shell would (quotes, # comments; ~/ is the home), read before the
  command line's.  Of two options that contradict each other the last wins, so the
  command line can undo a default: --no-filter-network, --share-net,
  --no-full-home-access, --no-allow-config-writes, --no-allow-private,
  --skip-permissions, --no-verbose.  Allow options from the file are ignored in a
  session without the filter.  The file holds this wrapper's options only (an unknown
  one is an error naming the line) and none that act once (--doctor, --learn, --shell,
  --dry-run, --list-presets).  --no-defaults ignores it.

--doctor
  Checks what --filter-network --unshare-net needs: bwrap and its version, a trial
  sandbox with the session's namespaces (explaining the sysctl or AppArmor setting
  that forbids one), the seccomp filter on this architecture, socat, the CLI (run
  with --version, bounded), and every allow rule from the files and options; notes
  the kernel's TIOCSTI switch and what this bwrap and env(1) lack, the network mode in
  force (advisory with --share-net), --host-port mappings, and allow rules that name the
  sandbox's own loopback (a hint pointing at --host-port).  Each failure
  comes with its fix.  Exit 0 when everything needed works, 1 otherwise.

Terminal and signals
  The CLI shares the wrapper's terminal and process group (no --new-session, which
  breaks TUIs), so Ctrl-C and window resizes reach it directly.  The wrapper and
  bwrap ignore SIGINT while the CLI runs (bwrap would die and take the sandbox with
  it), and the CLI gets it back by `env --default-signal`; SIGQUIT (Ctrl-\\) likewise.
  The proxy runs in a session of its own and socat_bridge.sh starts socat with setsid,
  so Ctrl-C never cuts the network.  SIGTERM and SIGHUP (and SIGQUIT before the CLI
  starts) end the session with full clean-up, which also empties what the sandbox made
  unwritable.  The CLI's exit status is the wrapper's.

Exit status: the CLI's; 2 for bad options (or a bad defaults file, or an allow rule
or allow file that does not parse: checked before anything starts); 127 when bwrap,
socat or the CLI is missing; 1 for other errors (HOME not an absolute directory, a
protection that cannot be set up...).  Errors are one line on stderr, whatever
happens.  A relative XDG_CONFIG_HOME is ignored.
"""

import argparse
import contextlib
import fcntl
import fnmatch
import glob
import json
import os
import secrets
import select
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.realpath(__file__))
FILTER_SCRIPT = os.path.join(HERE, "socks_filter.py")
BRIDGE_SCRIPT = os.path.join(HERE, "socat_bridge.sh")

# Where the proxy socket and the bridge script appear inside the sandbox.
SANDBOX_RUN = "/run/bw"
SANDBOX_SOCKET = SANDBOX_RUN + "/proxy.sock"
SANDBOX_BRIDGE = SANDBOX_RUN + "/socat_bridge.sh"

PROXY_READY_SECONDS = 10
STOP_SECONDS = 5
STATE_FILE_LIMIT = 64 << 20


PROJECT_KEY = "{project}"   # in a guarded key: the session's project directory, one segment

# What of ~/.claude.json goes back to the host: the state Claude keeps across runs
# (counters, onboarding and tips, caches, the project history and statistics), never what
# names a command or grants something: mcpServers, env, apiKeyHelper, primaryApiKey,
# allowedTools, enabled*McpjsonServers, enableAllProjectMcpServers, trust for other folders.
# The session's own project may record the trust dialog its user answered inside.
CLAUDE_JSON_KEYS = (
    "numStartups", "firstStartTime", "userID", "anonymousId", "hasCompletedOnboarding",
    "lastOnboardingVersion", "lastReleaseNotesSeen", "changelogLastFetched", "cachedChangelog",
    "tipsHistory", "*Count", "*UseCount", "has*Seen*", "has*Shown*", "hasUsed*",
    "hasSeenTasksHint", "cached*", "hasAvailableSubscription", "recommendedSubscription",
    "fallbackAvailableWarningThreshold", "feedbackSurveyState", "isQualifiedForDataSharing",
    "claudeCodeFirstTokenDate", "s1mAccessCache", "customApiKeyResponses", "oauthAccount",
    "bypassPermissionsModeAccepted", "theme", "lastPlanModeUse",
    "projects.*.history", "projects.*.last*", "projects.*.projectOnboardingSeenCount",
    "projects.*.hasCompletedProjectOnboarding", "projects.*.exampleFiles",
    "projects.*.exampleFilesGeneratedAt", "projects.*.hasClaudeMdExternalIncludesWarningShown",
    "projects.*.reactVulnerabilityCache",
    (f"projects.{PROJECT_KEY}.hasTrustDialogAccepted", (True, False)))


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the CLIs, as data."""
    name: str               # the command, looked up on PATH
    tool: str               # the wrapper's name, used in messages and config paths
    lookup: tuple           # home-relative places tried after PATH
    install_hint: str
    state_dirs: tuple       # home-relative, bound read-write (created if missing)
    state_files: tuple      # (home-relative file, keys): copied in; at exit only the changes
                            # to those keys (as `guarded`) are merged back (see above)
    allow: tuple            # default allow list for --filter-network
    env_names: tuple        # host variables passed through (fnmatch patterns)
    env: tuple = ()         # (name, value) set inside
    cli_args: tuple = ()    # put before the user's arguments
    helpers: tuple = ()     # other programs the CLI needs visible (found on PATH)
    guarded: tuple = ()     # (home-relative settings file, dotted keys the sandbox may change)
    expected_blocked: tuple = ()  # host:port every session contacts and the default allow list
                                  # blocks by design: summed up on one quiet line at exit


PROFILES = {
    "claude": Profile(
        name="claude",
        tool="bw-claude",
        lookup=(".claude/local/claude", ".local/bin/claude"),
        install_hint="npm install -g @anthropic-ai/claude-code",
        state_dirs=(".claude",),
        state_files=((".claude.json", CLAUDE_JSON_KEYS),),
        allow=("api.anthropic.com:443", "claude.ai:443", "claude.com:443",
               "platform.claude.com:443", "console.anthropic.com:443"),
        env_names=("ANTHROPIC_*", "CLAUDE_CODE_*", "DISABLE_TELEMETRY", "DISABLE_ERROR_REPORTING",
                   "DISABLE_BUG_COMMAND", "MAX_THINKING_TOKENS", "BASH_DEFAULT_TIMEOUT_MS",
                   "BASH_MAX_TIMEOUT_MS", "MCP_TIMEOUT"),
        # The install is read-only, and the sandbox is what makes skipping prompts safe.
        env=(("DISABLE_AUTOUPDATER", "1"), ("IS_SANDBOX", "1")),
        cli_args=("--allow-dangerously-skip-permissions",),
        # Measured (2.1.197, interactive start): raw.githubusercontent.com (release notes);
        # downloads.claude.ai is the updater's, which DISABLE_AUTOUPDATER mostly keeps quiet.
        expected_blocked=("raw.githubusercontent.com:443", "downloads.claude.ai:443"),
        guarded=((".claude/settings.json", ("skipDangerousModePermissionPrompt", "model",
                                            "outputStyle", "alwaysThinkingEnabled",
                                            "spinnerTipsEnabled", "feedbackSurveyState")),),
    ),
    "gemini": Profile(
        name="gemini",
        tool="bw-gemini",
        lookup=(),
        install_hint="npm install -g @google/gemini-cli",
        state_dirs=(".gemini",),
        state_files=(),
        allow=("generativelanguage.googleapis.com:443", "cloudcode-pa.googleapis.com:443",
               "oauth2.googleapis.com:443", "www.googleapis.com:443", "accounts.google.com:443"),
        env_names=("GEMINI_*", "GOOGLE_GEMINI_BASE_URL", "GOOGLE_API_KEY", "GOOGLE_CLOUD_PROJECT",
                   "GOOGLE_CLOUD_LOCATION",
                   "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_GCA"),
        helpers=("node",),
        # Measured (0.61.0, interactive start): usage statistics and the update check.
        expected_blocked=("play.googleapis.com:443", "registry.npmjs.org:443"),
        guarded=((".gemini/settings.json", ("security.auth.selectedType", "ui.theme",
                                            "model.name", "general.vimMode")),
                 # Trust given inside: for this project only, never for its parent.
                 (".gemini/trustedFolders.json", ((PROJECT_KEY, ("TRUST_FOLDER",
                                                                 "DO_NOT_TRUST")),))),
    ),
}

# Host variables every sandbox gets, when set.
ENV_NAMES = ("USER", "LOGNAME", "PATH", "SHELL", "TERM", "COLORTERM", "TERM_PROGRAM",
             "TERM_PROGRAM_VERSION", "NO_COLOR", "FORCE_COLOR", "LANG", "LANGUAGE", "LC_*", "TZ")

# Read-only from the host, when present.  A symlink (merged /usr) is recreated as one.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")
ETC_ENTRIES = ("alternatives", "bash.bashrc", "ca-certificates", "ca-certificates.conf",
               "crypto-policies", "debian_version", "gai.conf", "gitconfig", "group", "host.conf",
               "hostname", "hosts", "inputrc", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
               "locale.alias", "locale.conf", "localtime", "lsb-release", "mime.types",
               "nsswitch.conf", "os-release", "passwd", "pki", "profile", "protocols",
               "resolv.conf", "services", "shells", "ssl", "terminfo", "timezone", "vim")

# Home-relative tool directories made visible read-only, when present.
HOME_TOOLS = (".cargo", ".rustup", ".npm", ".nvm", ".pyenv", ".rbenv", ".volta", ".bun",
              ".deno", ".local/bin", ".local/lib", "go", ".gitconfig", ".config/git",
              ".inputrc", ".vimrc")

# Home-relative paths never visible: hidden by an empty mount wherever a bind exposes them.
SECRETS = (".ssh", ".aws", ".gnupg", ".kube", ".docker", ".netrc", ".password-store",
           ".git-credentials", ".npmrc", ".pypirc", ".vault-token", ".azure", ".pki",
           ".config/gh", ".config/hub", ".config/gcloud", ".config/op", ".config/git/credentials",
           ".cargo/credentials", ".cargo/credentials.toml", ".terraform.d/credentials.tfrc.json",
           ".local/share/keyrings", ".mozilla", ".thunderbird", ".config/google-chrome",
           ".config/chromium", ".config/BraveSoftware", ".config/microsoft-edge",
           ".config/vivaldi", ".config/opera", ".var/app", "snap/firefox", "snap/chromium",
           ".pgpass", ".my.cnf", ".m2/settings.xml", ".gradle/gradle.properties",
           ".config/rclone", ".config/containers/auth.json", ".s3cfg", ".boto",
           ".cache/huggingface/token", ".kaggle", ".bash_history", ".zsh_history",
           ".python_history", ".psql_history", ".lesshst", ".mysql_history",
           ".node_repl_history", ".sqlite_history", ".local/share/fish/fish_history")

# Sockets below what --full-home-access, --allow-ro and --allow-rw show are covered; the
# walk that finds them stops after this many entries, or this deep (said with --verbose).
SOCKET_WALK_ENTRIES = 20000
SOCKET_WALK_DEPTH = 8
REPOSITORY_SEARCH_SKIPS = (".git", "node_modules", ".venv", "venv", ".tox", "__pycache__",
                           ".mypy_cache", "target", ".gradle", ".cache")

# --allow-preset NAME: destinations developers commonly need, as allow rules (HTTPS only
# unless said).  Names, never wildcards over hosts that serve anyone's content.
PRESETS = {
    "github": ("GitHub: git over https, the API, raw files, release and archive downloads",
               ("github.com:443", "api.github.com:443", "codeload.github.com:443",
                "uploads.github.com:443", "raw.githubusercontent.com:443",
                "objects.githubusercontent.com:443", "gist.githubusercontent.com:443",
                "github-releases.githubusercontent.com:443",
                "release-assets.githubusercontent.com:443")),
    "npm": ("npm and yarn registries",
            ("registry.npmjs.org:443", "registry.yarnpkg.com:443", "repo.yarnpkg.com:443")),
    "pypi": ("Python packages (pip, uv, poetry)",
             ("pypi.org:443", "files.pythonhosted.org:443")),
    "crates": ("Rust crates (cargo)",
               ("crates.io:443", "index.crates.io:443", "static.crates.io:443",
                "static.rust-lang.org:443")),
    "go": ("Go modules through the Go module proxy and checksum database",
           ("proxy.golang.org:443", "sum.golang.org:443")),
    "rubygems": ("Ruby gems (gem, bundler)",
                 ("rubygems.org:443", "index.rubygems.org:443")),
    "maven": ("Maven Central and the Gradle plugin portal",
              ("repo.maven.apache.org:443", "repo1.maven.org:443", "plugins.gradle.org:443",
               "plugins-artifacts.gradle.org:443", "services.gradle.org:443",
               "downloads.gradle.org:443")),
    "debian": ("Debian package archives (http and https)",
               ("deb.debian.org:80", "deb.debian.org:443", "security.debian.org:80",
                "security.debian.org:443")),
    "ubuntu": ("Ubuntu package archives (http and https)",
               ("archive.ubuntu.com:80", "archive.ubuntu.com:443", "security.ubuntu.com:80",
                "security.ubuntu.com:443", "ports.ubuntu.com:80", "ports.ubuntu.com:443")),
}

REASONS = {
    "not-in-allowlist": "not in allow list",
    "denied-by-rule": "denied by rule",
    "private-address": "private address",
    "ip-literal-not-allowed": "IP address without an IP rule",
    "sni-mismatch": "TLS name differs from the requested host",
    "bad-name": "malformed name",
    "bad-port": "bad port",
    "too-many-connections": "too many connections",
    "bad-request": "malformed request",
    # A tunnel to a name that did not open with a ClientHello naming that host (socks_filter).
    "no-sni": "TLS without a server name",
    "not-tls": "not TLS",
    "bad-client-hello": "malformed TLS ClientHello",
    "tls-timeout": "no TLS ClientHello in time",
    "tls-alert-first": "TLS alert before the ClientHello",
    "tls-change-cipher-spec-first": "TLS change-cipher-spec before the ClientHello",
    "tls-heartbeat-first": "TLS heartbeat before the ClientHello",
    "tls-data-first": "TLS application data before the ClientHello",
    "proxy-auth": "no session credential",
    # Allowed, but the connection did not happen.
    "lookup-failed": "DNS lookup failed",
    "connect-refused": "connection refused",
    "unreachable": "unreachable",
    "connect-timeout": "connect timed out",
    "connect-failed": "connect failed",
}
# Reasons an --allow-domain HOST:PORT would cure.
ALLOWABLE = {"not-in-allowlist", "ip-literal-not-allowed"}
SUMMARY_HOSTS = 10

# Paths an agent could write to get code run later, outside the sandbox (NOTES section 2):
# read-only even though their parent is writable, and held by an empty placeholder for the
# session when they do not exist yet, so they cannot be created.  A trailing "/" marks a
# directory.  Paths under .git count only when .git is a directory; a .git that is a file
# (a linked worktree, a submodule) is itself read-only.  They apply to the project and to
# every --allow-rw directory.  .git/info/ stays writable: its attributes can only name
# drivers whose commands come from .git/config, as .gitattributes in the tree can.
PROTECTED_PROJECT = (".git/hooks/", ".git/config", ".git/commondir", ".git/config.worktree",
                     ".git/modules/", ".git/worktrees/", ".claude/settings.json",
                     ".claude/settings.local.json", ".claude/commands/", ".claude/agents/",
                     ".claude/hooks/", ".claude/skills/", ".mcp.json", ".gemini/settings.json",
                     ".gemini/.env", ".gemini/commands/", ".gemini/extensions/", ".vscode/",
                     ".idea/")
# The CLIs' own state directories are writable (sessions, history, credentials...), but
# these in them hold code or name commands the CLI runs later, unsandboxed.
PROTECTED_HOME = (".claude/settings.json", ".claude/settings.local.json", ".claude/hooks/",
                  ".claude/plugins/", ".claude/skills/", ".claude/local/", ".claude/commands/",
                  ".claude/agents/", ".gemini/settings.json", ".gemini/trustedFolders.json",
                  ".gemini/.env",
                  ".gemini/extensions/", ".gemini/commands/")
PROTECTED_GLOBS = (".claude/settings*.json",)
# Scripts at the top of a state directory (a status line, hook scripts): read-only too.
PROTECTED_HOME_GLOBS = tuple(f"{d}/{pattern}" for d in (".claude", ".gemini")
                             for pattern in ("*.sh", "*.bash", "*.zsh", "*.py", "*.js", "*.mjs",
                                             "*.cjs", "*.ts", "*.rb", "*.pl"))
# A placeholder for a missing .json file holds an empty object: an empty file is invalid
# JSON, and Gemini CLI refuses to start on it.  A missing .git/commondir is held by one
# naming .git itself (git refuses an empty one).
PLACEHOLDER_JSON = b"{}\n"
PLACEHOLDER_COMMONDIR = b".\n"

# seccomp: ioctl(TIOCSTI) pushes keystrokes into the terminal the sandbox shares with the
# user's shell, ioctl(TIOCLINUX) can too on a virtual console.  Classic BPF over
# struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}: the request is args[1], of
# which the kernel uses only the low 32 bits, so only they are compared (CVE-2019-10063).
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
SECCOMP_ARCHES = {  # os.uname().machine: ((AUDIT_ARCH_*, (ioctl syscall numbers)), ...)
    "x86_64": ((0xC000003E, (16, 0x40000000 | 514)),     # x86-64, and its x32 ABI
               (0x40000003, (54,))),                      # i386 programs
    "aarch64": ((0xC00000B7, (29,)),
                (0x40000028, (54,))),                     # 32-bit ARM programs
}
SECCOMP_RET_ALLOW, SECCOMP_RET_EPERM = 0x7FFF0000, 0x00050000 | 1
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06


class Failure(Exception):
    """A clear, expected error: printed as one line, exit with code."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived; unwinds through the clean-up code."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise Failure(f"{message} (see --help)", 2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps option names whole when wrapping help (--no-filter-network, not --no-filter-)."""

    def _split_lines(self, text, width):
        import textwrap
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class SetAll(argparse.Action):
    """An option that sets several destinations at once (--no-network)."""

    def __init__(self, option_strings, dest, values, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.values = values

    def __call__(self, parser, namespace, values, option_string=None):
        for name, value in self.values.items():
            setattr(namespace, name, value)


def add_switch(group, on, off, help, short=()):
    """A boolean option and its negation; the last one given wins, so a command-line option
    can undo one from the defaults file.  None means neither was given."""
    dest = on[2:].replace("-", "_")
    group.add_argument(*short, on, dest=dest, action="store_const", const=True, default=None,
                       help=f"{help} (undo: {off})")
    group.add_argument(off, dest=dest, action="store_const", const=False, help=argparse.SUPPRESS)


def build_parser(profile):
    tool, cli = profile.tool, profile.name
    parser = Parser(
        prog=tool, allow_abbrev=False,
        usage=f"{tool} [options] [--] [{cli} arguments]",
        formatter_class=HelpFormatter,
        description=f"Run {cli} in a bubblewrap sandbox: read-only system, an empty home with only "
                    f"{cli}'s state,\nthe project directory writable, secrets (~/.ssh, ~/.aws, ...) "
                    "never visible.\nOptions this wrapper does not know, and everything after --, "
                    f"go to {cli}.\nOf two options that contradict each other, the last wins.",
        epilog=f"examples:\n"
               f"  {tool}                                  {cli} in the current directory\n"
               f"  {tool} --filter-network                 network only to {cli}'s API\n"
               f"  {tool} --filter-network --allow-domain registry.npmjs.org:443\n"
               f"  {tool} --filter-network --allow-domain github.com:22/raw   ssh to GitHub\n"
               f"  {tool} --filter-network --host-port 5173   the host's localhost:5173 inside\n"
               f"  {tool} --learn ~/learned                open network; writes what was used\n"
               f"  {tool} --filter-network --allow-file ~/learned   ...then only that\n"
               f"  {tool} --shell -- -c 'ls -la ~'         look around inside the sandbox\n"
               f"  {tool} --dry-run -v                     show what would run\n"
               f"files:\n"
               f"  ~/.config/{tool}/options          options read before the command line's,\n"
               f"  {'':{len(tool) + 26}}  e.g. a line: --filter-network\n"
               f"  ~/.config/{tool}/allowed-domains  allow rules, one a line, # comments\n"
               f"  (both under $XDG_CONFIG_HOME instead of ~/.config when it is set)")
    sandbox = parser.add_argument_group(
        "sandbox", f"what {cli} sees; e.g. {tool} --dir ~/src/app --allow-ro ~/src/shared-lib")
    sandbox.add_argument("--dir", metavar="PATH",
                         help="project directory, writable inside (default: the current directory)")
    sandbox.add_argument("--allow-ro", metavar="PATH", action="append", default=[],
                         help="also show PATH read-only (repeatable; must exist)")
    sandbox.add_argument("--allow-rw", metavar="PATH", action="append", default=[],
                         help="also show PATH read-write (repeatable; must exist)")
    add_switch(sandbox, "--full-home-access", "--no-full-home-access",
               "show the whole home read-only (secrets stay hidden)")
    sandbox.add_argument("--pass-env", metavar="VAR", action="append", default=[],
                         help="pass this host variable in (repeatable)")
    sandbox.add_argument("--env", metavar="VAR=VALUE", action="append", default=[],
                         help="set a variable inside, over any other (repeatable)")
    sandbox.add_argument("--shell", action="store_true",
                         help=f"run a shell instead of {cli}; arguments after -- go to it, "
                              "e.g. --shell -- -c 'cmd'")
    add_switch(sandbox, "--allow-config-writes", "--no-allow-config-writes",
               "let the sandbox change .git/hooks, .git/config, .claude/settings*.json, "
               ".mcp.json and the like (risk: code the agent writes there runs later, outside "
               "the sandbox)")
    if profile.cli_args:
        add_switch(sandbox, "--no-skip-permissions", "--skip-permissions",
                   f"do not pass {' '.join(profile.cli_args)} to {cli}")
    network = parser.add_argument_group(
        "network", f"e.g. {tool} --filter-network --allow-preset github --allow-preset npm")
    network.add_argument("--no-network", action=SetAll, dest=argparse.SUPPRESS,
                         values={"unshare_net": True, "filter_network": False},
                         help="no network at all (an empty network namespace); "
                              "--unshare-net --no-filter-network")
    add_switch(network, "--unshare-net", "--share-net",
               "an empty network namespace (the default with --filter-network); "
               "--filter-network --share-net is advisory: programs that ignore the proxy "
               "variables reach the network directly, and the proxy asks every client for a "
               "per-session credential, so other local users cannot use it")
    add_switch(network, "--filter-network", "--no-filter-network",
               f"network only through a filtering proxy that allows the {cli} API and your "
               "allow list; implies --unshare-net, so nothing else gets out")
    network.add_argument("--allow-domain", metavar="RULE", action="append", default=[],
                         help="allow a destination: example.com, *.example.com, 1.2.3.4, "
                              "10.0.0.0/8, [::1], each with optional :PORT; a name carries "
                              "only TLS for that name unless the rule ends in :PORT/raw "
                              "(ssh, plain HTTP, a database: github.com:22/raw) (repeatable)")
    network.add_argument("--host-port", metavar="PORT[:HOSTPORT]", action="append", default=[],
                         help="make the host's 127.0.0.1:HOSTPORT (default PORT) appear at "
                              "127.0.0.1:PORT inside, through the proxy, which logs it "
                              "(repeatable; needs --unshare-net)")
    network.add_argument("--allow-file", metavar="FILE", action="append", default=[],
                         help="read allow rules from FILE, one a line (repeatable)")
    network.add_argument("--allow-preset", metavar="NAME", action="append", default=[],
                         help="allow a ready-made list: " + ", ".join(PRESETS) +
                              " (repeatable; see --list-presets)")
    network.add_argument("--learn", metavar="FILE",
                         help="open network (private addresses excepted) through the proxy, "
                              "and at exit write the destinations used to FILE, ready for "
                              "--allow-file; implies --filter-network --unshare-net")
    add_switch(network, "--allow-private", "--no-allow-private",
               "DANGEROUS: let allowed names reach loopback and private addresses (your LAN, "
               "the cloud metadata service, services on this machine); with --learn, learn them "
               "too.  An IP rule (--allow-domain 10.0.0.5:8080) is the narrow way")
    network.add_argument("--proxy-log", metavar="FILE",
                         help="keep the proxy's JSON log (one object per decision and close) "
                              "in FILE")
    diagnostics = parser.add_argument_group("diagnostics", f"e.g. {tool} --doctor")
    diagnostics.add_argument("--doctor", action="store_true",
                             help="check bwrap, user namespaces, socat, the CLI, the seccomp "
                                  "filter and the allow lists, saying how to fix what fails")
    diagnostics.add_argument("--list-presets", action="store_true",
                             help="print the --allow-preset lists, in allow-file format")
    diagnostics.add_argument("--no-defaults", action="store_true",
                             help=f"ignore ~/.config/{tool}/options")
    add_switch(diagnostics, "--verbose", "--no-verbose",
               "print the configuration and the full commands to stderr", short=("-v",))
    diagnostics.add_argument("--dry-run", action="store_true",
                             help="print the commands that would run, shell-quoted, and exit")
    return parser


# Options that do something once and so have no place in the defaults file.
ONE_SHOT = ("--doctor", "--list-presets", "--dry-run", "--shell", "--learn", "--no-defaults",
            "--help", "-h", "--")
# Options that mean nothing without the proxy: refused on the command line without it,
# ignored when they come from the defaults file (a session run with --no-filter-network).
NEEDS_FILTER = (("--allow-domain", "allow_domain"), ("--allow-file", "allow_file"),
                ("--allow-preset", "allow_preset"), ("--proxy-log", "proxy_log"),
                ("--allow-private", "allow_private"), ("--host-port", "host_port"))


def split_argv(argv):
    """(our options, the CLI's arguments after the first "--")."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def parse_args(profile, argv, defaults=()):
    """Our options before the first "--"; everything we do not know goes to the CLI.
    `defaults` (from the defaults file) are read first, so the command line wins."""
    ours, after = split_argv(argv)
    parser = build_parser(profile)
    given, unknown = parser.parse_known_args(ours)
    opts = parser.parse_known_args([*defaults, *ours])[0] if defaults else given
    opts.args = unknown + after
    resolve_options(opts, given)
    return opts


def resolve_options(opts, given):
    """Turn the switches into plain booleans and refuse what cannot work.  `given` is the
    command line alone: what the defaults file adds is never an error by itself."""
    learn = opts.learn is not None
    if learn and opts.filter_network is False:
        raise Failure("--learn and --no-filter-network (or --no-network) contradict each other", 2)
    opts.filter_network = learn or bool(opts.filter_network)
    # Filtering is enforced unless sharing the host's network is asked for (--share-net).
    opts.unshare_net = opts.filter_network if opts.unshare_net is None else opts.unshare_net
    for name in ("full_home_access", "allow_config_writes", "allow_private", "verbose"):
        setattr(opts, name, bool(getattr(opts, name)))
    opts.no_skip_permissions = bool(getattr(opts, "no_skip_permissions", False))
    if not opts.filter_network:
        for flag, name in NEEDS_FILTER:
            if getattr(given, name):
                raise Failure(f"{flag} needs --filter-network", 2)
    opts.host_port = host_ports(opts, given)
    for name in opts.allow_preset:
        if name not in PRESETS:
            raise Failure(f"--allow-preset {name!r}: no such preset; there are "
                          f"{', '.join(PRESETS)} (see --list-presets)", 2)
    for assignment in opts.env:
        name, eq, _ = assignment.partition("=")
        if not eq or not name.isidentifier():
            raise Failure(f"--env {assignment!r}: expected VAR=VALUE", 2)
    for name in opts.pass_env:
        if not name.isidentifier():
            raise Failure(f"--pass-env {name!r}: not a variable name", 2)


def config_path(environ, tool, name):
    """~/.config/TOOL/NAME, honouring XDG_CONFIG_HOME."""
    base = environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):         # relative: ignored, as the XDG spec says
        base = os.path.join(environ.get("HOME", ""), ".config")
    return os.path.join(base, tool, name)


def expand_home(token, home):
    """~/x, and --opt=~/x, as paths in the home: shlex does not expand them."""
    option, eq, value = token.partition("=") if token.startswith("--") else ("", "", token)
    if value == "~" or value.startswith("~/"):
        value = home + value[1:]
    return option + eq + value


def parse_defaults(profile, text, path, home):
    """The defaults file's options: each line shlex-split, '#' comments.  Every line must be
    complete options of ours, so a typo is an error here rather than an argument to the CLI."""
    parser, tokens = build_parser(profile), []
    for number, line in enumerate(text.splitlines(), start=1):
        if "\0" in line:
            raise Failure(f"{path}:{number}: a NUL character; the file must be text", 2)
        try:
            words = [expand_home(w, home) for w in shlex.split(line, comments=True)]
        except ValueError as error:
            raise Failure(f"{path}:{number}: {error}", 2) from None
        for word in words:
            if word.split("=")[0] in ONE_SHOT:
                raise Failure(f"{path}:{number}: {word.split('=')[0]} does not belong in the "
                              "defaults file (give it on the command line)", 2)
        try:
            unknown = parser.parse_known_args(words)[1]
        except Failure as error:
            raise Failure(f"{path}:{number}: {error}", 2) from None
        if unknown:
            raise Failure(f"{path}:{number}: {unknown[0]} is not a {profile.tool} option "
                          f"(the defaults file holds {profile.tool} options only)", 2)
        tokens += words
    return tokens


def read_defaults(profile, environ):
    """The defaults file's options, or [] when there is none."""
    path = config_path(environ, profile.tool, "options")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as error:
        raise Failure(f"cannot read {path}: {error}", 2) from None
    return parse_defaults(profile, text, path, environ.get("HOME", ""))


def preset_rules(names):
    """The rules of the named presets, each once, in order."""
    return list(dict.fromkeys(rule for name in names for rule in PRESETS[name][1]))


def format_presets():
    """--list-presets: every preset as a commented block of an allow file."""
    blocks = [f"# {name}: {description} (--allow-preset {name})\n" + "\n".join(rules)
              for name, (description, rules) in PRESETS.items()]
    return "\n\n".join(blocks) + "\n"


def is_within(path, parent):
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def find_program(name, search_path, skip=()):
    """Like shutil.which, but never returns one of `skip` (our own entry scripts)."""
    for directory in search_path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if (os.path.isfile(candidate) and os.access(candidate, os.X_OK)
                and os.path.realpath(candidate) not in skip):
            return os.path.abspath(candidate)
    return None


def find_cli(profile, search_path, home, skip=()):
    found = find_program(profile.name, search_path, skip)
    if found:
        return found
    for relative in profile.lookup:
        candidate = os.path.join(home, relative)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def symlink_chain(path):
    """`path`, every symlink it goes through, and its real path."""
    chain, seen = [path], set()
    while os.path.islink(path) and path not in seen:
        seen.add(path)
        path = os.path.join(os.path.dirname(path), os.readlink(path))
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        chain.append(path)
    real = os.path.realpath(path)
    if real not in chain:
        chain.append(real)
    return chain


def install_roots(chain, home):
    """Directories to show read-only so the programs in `chain` run.

    An npm install is the whole node_modules tree the file sits in; anything else is
    the file's directory.  System directories are visible already; the home directory
    itself is never shown whole, only the file.
    """
    roots = []
    for path in chain:
        parts = path.split("/")
        if "node_modules" in parts:
            root = "/".join(parts[:parts.index("node_modules") + 1])
        else:
            root = os.path.dirname(path)
        if any(is_within(root, d) for d in SYSTEM_DIRS):
            continue
        if is_within(home, root):
            root = path
        if root not in roots:
            roots.append(root)
    return [r for r in roots if not any(r != o and is_within(r, o) for o in roots)]


def build_env(profile, environ, home, pass_env=(), assignments=()):
    """The sandbox's environment: allow list, profile defaults, --pass-env, --env."""
    patterns = ENV_NAMES + profile.env_names
    env = {name: value for name, value in environ.items()
           if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    env["HOME"] = home
    env.update(profile.env)
    env.update((name, environ[name]) for name in pass_env if name in environ)
    env.update(a.partition("=")[::2] for a in assignments)
    return env


def env_resets_signals(path):
    """Whether this env(1) has --default-signal (coreutils >= 8.31), read without running it."""
    try:
        with open(path, "rb") as f:
            return b"default-signal" in f.read(1 << 20)
    except OSError:
        return False


@dataclass
class Plan:
    """Everything decided about one session; build_*_args turn it into commands."""
    profile: Profile
    home: str
    project: str
    command: list
    env: dict
    bwrap: str = "bwrap"
    system: list = field(default_factory=list)      # (path, symlink target or None)
    etc: list = field(default_factory=list)
    mounts: list = field(default_factory=list)      # (option, source or None, destination)
    unshare_net: bool = False
    filter: bool = False
    allow: list = field(default_factory=list)
    allow_files: list = field(default_factory=list)
    allow_private: bool = False
    learn: str = None                               # --learn FILE: audit mode, write FILE
    proxy_log: str = None
    socat: str = "socat"
    env_program: str = None                         # env(1) that can reset SIGINT
    seccomp: bytes = None                           # the TIOCSTI filter program
    disable_userns: bool = False                    # bwrap has --disable-userns
    placeholders: list = field(default_factory=list)  # protected paths to create first
    guarded: list = field(default_factory=list)     # (host path, keys): bound as a copy
    sockets_complete: bool = True                   # the socket and repository walks
                                                    # saw everything
    verbose: bool = False
    dry_run: bool = False
    host_ports: list = field(default_factory=list)  # --host-port: (inside, host port)
    proxy_token: str = None                         # --share-net: the proxy's password


def hidden_paths(profile):
    """Home-relative paths this profile's sandbox never shows: SECRETS, and the other
    CLIs' state (their credentials: ~/.gemini/oauth_creds.json from bw-claude,
    ~/.claude/.credentials.json and ~/.claude.json from bw-gemini)."""
    others = [p for p in PROFILES.values() if p.name != profile.name]
    return tuple(dict.fromkeys([*SECRETS, *(d for p in others for d in p.state_dirs),
                                *(f for p in others for f, _ in p.state_files)]))


def home_mounts(profile, home, full_home, entries, exists=os.path.lexists):
    """Binds that populate the session's home; `entries` lists the real home."""
    mounts = [("--bind", os.path.join(home, d), os.path.join(home, d)) for d in profile.state_dirs]
    files = [f for p in PROFILES.values() for f, _ in p.state_files]
    skip = set(profile.state_dirs) | set(files) | set(hidden_paths(profile))
    if full_home:
        shown = [e for e in sorted(entries) if e not in skip
                 and not any(e.startswith(f + ".") for f in files)]
    else:
        shown = [t for t in HOME_TOOLS if exists(os.path.join(home, t))]
    mounts += [("--ro-bind", os.path.join(home, e), os.path.join(home, e)) for e in shown]
    return mounts


def showable_entries(home, hidden=SECRETS):
    """The home's entries --full-home-access may show: no sockets, and no symlink to a
    secret or back to the home itself."""
    entries = set()
    for entry in os.listdir(home):
        path = os.path.join(home, entry)
        real = os.path.realpath(path)
        try:
            is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            continue
        if is_socket or is_within(home, real) or any(
                is_within(real, os.path.join(home, s)) for s in hidden):
            continue
        entries.add(entry)
    return entries


def secret_masks(home, mounts, exists=os.path.lexists, isdir=os.path.isdir, hidden=SECRETS,
                 realpath=os.path.realpath):
    """Empty mounts over every secret that one of `mounts` would expose, at its path and,
    when that is a symlink (~/.ssh -> dotfiles/ssh), at its real path too."""
    masks = []
    sources = [src for option, src, _ in mounts if src]
    for relative in hidden:
        path = os.path.join(home, relative)
        if not exists(path):
            continue
        for candidate in dict.fromkeys([path, realpath(path)]):
            if exists(candidate) and any(is_within(candidate, src) and src != candidate
                                         for src in sources):
                masks.append(("--tmpfs", None, candidate) if isdir(candidate)
                             else ("--ro-bind", "/dev/null", candidate))
    return masks


def refuse_path(flag, path, home, hidden=SECRETS):
    """Refuse a project or extra bind that would expose the home or a secret."""
    if is_within(home, path):
        raise Failure(f"{flag} {path}: that is your home directory or above it; "
                      "choose a project directory")
    for relative in hidden:
        secret = os.path.join(home, relative)
        if is_within(path, secret) or (os.path.lexists(secret)
                                       and is_within(path, os.path.realpath(secret))):
            raise Failure(f"{flag} {path}: secrets (~/{relative}) are never shown in the sandbox")


def socket_masks(shown, home, hidden):
    """/dev/null over each unix socket below the shown trees ((host source, sandbox path)
    pairs), so no host service is reachable through one: (mounts, walk complete)."""
    masks, complete = [], True
    secrets = [os.path.join(home, h) for h in hidden]
    for source, dest in shown:
        real = os.path.realpath(source)
        found, whole = find_sockets([real])
        complete = complete and whole
        for path in found:
            if path == real:        # a socket named on the command line: asked for
                continue
            inside = os.path.join(dest, os.path.relpath(path, real))
            if not any(is_within(inside, s) for s in secrets):
                masks.append(("--ro-bind", "/dev/null", inside))
    return masks, complete


def bounded_walk(roots, prune=(), limit=None, max_depth=None):
    """([(path, st_mode)] for everything below `roots`, complete): a walk that follows no
    symlink, does not enter directories named in `prune`, and stops after `limit`
    entries or `max_depth` levels (complete is then False)."""
    limit = SOCKET_WALK_ENTRIES if limit is None else limit
    max_depth = SOCKET_WALK_DEPTH if max_depth is None else max_depth
    found, seen, stack = [], 0, [(root, 0) for root in reversed(roots)]
    complete = True
    while stack:
        path, level = stack.pop()
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            continue
        found.append((path, mode))
        if not stat.S_ISDIR(mode) or (level and os.path.basename(path) in prune):
            continue
        if level >= max_depth:
            complete = False
            continue
        try:
            with os.scandir(path) as entries:
                names = []
                for entry in entries:
                    seen += 1
                    if seen > limit:
                        return found, False
                    names.append(entry.name)
        except OSError:
            continue
        stack += [(os.path.join(path, name), level + 1) for name in sorted(names, reverse=True)]
    return found, complete


def find_sockets(roots, limit=None, max_depth=None):
    """Unix sockets under `roots`: (sockets, complete)."""
    found, complete = bounded_walk(roots, limit=limit, max_depth=max_depth)
    return [path for path, mode in found if stat.S_ISSOCK(mode)], complete


def nested_repositories(roots):
    """Directories below `roots` (not the roots) holding a .git, directory or file (a
    submodule's checkout): (directories, complete).  Dependency and build trees
    (REPOSITORY_SEARCH_SKIPS) are not searched: large, and no place for a repository of
    the user's."""
    found, complete = bounded_walk(roots, prune=REPOSITORY_SEARCH_SKIPS)
    repos = [os.path.dirname(path) for path, _ in found if os.path.basename(path) == ".git"]
    return [r for r in dict.fromkeys(repos) if r not in roots], complete


def checked_home(environ):
    """$HOME, which must be an existing absolute directory: a relative one would make
    the project (the working directory) the home, its files the CLI's and ours."""
    home = environ.get("HOME", "")
    if not os.path.isabs(home) or not os.path.isdir(home):
        raise Failure(f"HOME is {printable(home)!r}; it must be an existing absolute directory")
    return os.path.normpath(home)


def cli_places(profile):
    """Where find_cli looks, for messages."""
    return ", ".join(["PATH"] + [f"~/{p}" for p in profile.lookup])


def make_plan(profile, opts, environ, skip=()):
    """Look at the host (paths, programs) and decide the session."""
    home = checked_home(environ)
    project = os.path.realpath(opts.dir or os.getcwd())
    if not os.path.isdir(project):
        raise Failure(f"--dir {opts.dir}: not a directory")
    refuse_path("--dir", project, home, hidden_paths(profile))
    search_path = environ.get("PATH", os.defpath)
    cli = find_cli(profile, search_path, home, skip)
    if cli is None and not opts.shell:
        raise Failure(f"{profile.name} not found (looked in {cli_places(profile)}); install it: "
                      f"{profile.install_hint}", 127)
    programs = [cli] if cli else []
    for helper in profile.helpers:
        found = find_program(helper, search_path)
        if found is None and not opts.shell:
            raise Failure(f"{helper} not found on PATH; {profile.name} needs it", 127)
        programs += [found] if found else []
    if opts.shell:
        shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
        command = [shell, *opts.args]
    else:
        extra = [] if opts.no_skip_permissions else list(profile.cli_args)
        command = [cli, *extra, *opts.args]

    hidden = hidden_paths(profile)
    entries = showable_entries(home, hidden) if opts.full_home_access else set()
    mounts = home_mounts(profile, home, opts.full_home_access, entries)
    rw_extra = []
    for flag, option, paths in (("--allow-ro", "--ro-bind", opts.allow_ro),
                                ("--allow-rw", "--bind", opts.allow_rw)):
        for path in paths:
            real = os.path.realpath(path)
            if not os.path.exists(real):
                raise Failure(f"{flag} {path}: no such file or directory")
            refuse_path(flag, real, home, hidden)
            mounts.append((option, real, real))
            if option == "--bind":
                rw_extra.append(real)
    # Sockets are searched for where the user chose to show a tree (--allow-*, the whole
    # home), not in the CLI's state or the tool directories: toolchains hold tens of
    # thousands of files and no sockets, and walking them would cost every start.
    skipped = {os.path.join(home, d) for d in (*profile.state_dirs, *HOME_TOOLS)}
    sockets, walked = socket_masks([(src, dest) for _, src, dest in mounts
                                    if src and src not in skipped], home, hidden)
    socat = shutil.which("socat", path=search_path) or "socat"
    if opts.filter_network:
        programs.append(socat)
    for program in programs:
        mounts += [("--ro-bind", r, r) for r in install_roots(symlink_chain(program), home)]
    mounts.append(("--bind", project, project))
    mounts += secret_masks(home, mounts, hidden=hidden)
    mounts += sockets
    placeholders, guarded = [], []
    if not opts.allow_config_writes:
        rw_roots = [dest for option, _, dest in mounts if option == "--bind"]
        guarded = [(os.path.join(home, relative), keys) for relative, keys in profile.guarded
                   if any(is_within(os.path.join(home, relative), r) for r in rw_roots)]
        nested, whole = nested_repositories([project, *rw_extra])
        walked = walked and whole
        protected, placeholders = protection(project, home, rw_roots, rw_extra, nested)
        copies = {path for path, _ in guarded}
        # The guarded settings files are bound as copies instead (build_bwrap_args).
        mounts += [m for m in protected if not (m[0] == "--ro-bind" and m[2] in copies)]

    allow_files = []
    user_file = config_path({**environ, "HOME": home}, profile.tool, "allowed-domains")
    for path in ([user_file] if os.path.isfile(user_file) else []) + opts.allow_file:
        if not os.path.isfile(path):
            raise Failure(f"--allow-file {path}: no such file")
        allow_files.append(os.path.abspath(path))
    allow = list(profile.allow) + preset_rules(opts.allow_preset) + opts.allow_domain
    allow += [host_port_rule(host) for _, host in opts.host_port]
    if opts.filter_network:
        # Every rule now, before anything starts: the proxy would refuse it later.
        problems = rule_problems(allow, allow_files)[1]
        if problems:
            raise Failure(f"bad allow rule: {problems[0]}", 2)
    learn = os.path.abspath(opts.learn) if opts.learn else None
    if learn and (os.path.isdir(learn) or not os.access(os.path.dirname(learn), os.W_OK)):
        raise Failure(f"--learn {opts.learn}: cannot write a file there")

    env_program = shutil.which("env", path="/usr/bin:/bin")
    bwrap = shutil.which("bwrap", path=search_path) or "bwrap"
    token = advisory_token(opts)
    return Plan(
        profile=profile, home=home, project=project, command=command,
        env=with_token(build_env(profile, environ, home, opts.pass_env, opts.env), token),
        bwrap=bwrap,
        system=[(d, os.readlink(d) if os.path.islink(d) else None)
                for d in SYSTEM_DIRS if os.path.lexists(d)],
        etc=[f"/etc/{e}" for e in ETC_ENTRIES if os.path.exists(f"/etc/{e}")],
        mounts=mounts,
        unshare_net=opts.unshare_net,
        filter=opts.filter_network,
        allow=allow,
        allow_files=allow_files,
        allow_private=opts.allow_private,
        learn=learn,
        proxy_log=os.path.abspath(opts.proxy_log) if opts.proxy_log else None,
        socat=socat,
        env_program=env_program if env_program and env_resets_signals(env_program) else None,
        seccomp=tiocsti_filter(os.uname().machine),
        disable_userns=bwrap_supports(bwrap, "--disable-userns"),
        placeholders=placeholders,
        guarded=guarded,
        sockets_complete=walked,
        verbose=opts.verbose, dry_run=opts.dry_run,
        host_ports=opts.host_port, proxy_token=token)


def assemble(program):
    """Classic BPF from (op, k[, label to jump to when true]) and ("label", name) items;
    a false comparison falls through to the next instruction."""
    at, labels = 0, {}
    for item in program:
        if item[0] == "label":
            labels[item[1]] = at
        else:
            at += 1
    code, at = b"", 0
    for item in program:
        if item[0] == "label":
            continue
        op, k, if_true = (*item, None)[:3]
        jt = labels[if_true] - at - 1 if if_true else 0
        code += struct.pack("=HBBI", op, jt, 0, k)
        at += 1
    return code


def tiocsti_filter(machine):
    """The seccomp program that makes ioctl(TIOCSTI/TIOCLINUX) fail with EPERM."""
    arches = SECCOMP_ARCHES.get(machine)
    if arches is None:
        raise Failure(f"the keystroke-injection filter supports {' and '.join(SECCOMP_ARCHES)}, "
                      f"not {machine}; refusing to start without it")
    program = [(BPF_LD_W_ABS, 4)]
    program += [(BPF_JEQ_K, arch, f"arch{i}") for i, (arch, _) in enumerate(arches)]
    program.append((BPF_RET_K, SECCOMP_RET_ALLOW))
    for i, (arch, numbers) in enumerate(arches):
        program += [("label", f"arch{i}"), (BPF_LD_W_ABS, 0)]
        program += [(BPF_JEQ_K, n, "request") for n in numbers]
        program.append((BPF_RET_K, SECCOMP_RET_ALLOW))
    program += [("label", "request"), (BPF_LD_W_ABS, 24),
                (BPF_JEQ_K, TIOCSTI, "deny"), (BPF_JEQ_K, TIOCLINUX, "deny"),
                (BPF_RET_K, SECCOMP_RET_ALLOW),
                ("label", "deny"), (BPF_RET_K, SECCOMP_RET_EPERM)]
    return assemble(program)


def bwrap_supports(bwrap, option):
    """Whether this bwrap knows `option`, read from its binary rather than by running it."""
    try:
        with open(bwrap, "rb") as f:
            return option.encode() in f.read(4 << 20)
    except OSError:
        return False


def protection(project, home, rw_roots, extra=(), nested=(), exists=os.path.lexists,
               isdir=os.path.isdir, glob=glob.glob):
    """What keeps PROTECTED_* read-only: (mounts, placeholders to create first).

    PROTECTED_PROJECT applies to the project and to each of `extra` (the --allow-rw
    directories); its .git entries to each of `nested` (repositories below them).  Each protected path is bound read-only onto itself; the directories
    between it and its writable root are bound onto themselves, which pins them (a mount
    point cannot be renamed, so `mv .git x` cannot carry the protection away).
    """
    bases = list(dict.fromkeys([project, *extra]))
    wanted = []
    for base in bases + [n for n in nested if n not in bases]:
        git = os.path.join(base, ".git")
        if exists(git) and not isdir(git):
            wanted.append((base, ".git"))      # a gitdir: pointer file
        wanted += [(base, p) for p in PROTECTED_PROJECT
                   if base in bases or p.startswith(".git/")]
    wanted += [(home, p) for p in PROTECTED_HOME]
    for base in bases + [home]:
        for pattern in PROTECTED_GLOBS + (PROTECTED_HOME_GLOBS if base == home else ()):
            wanted += [(base, os.path.relpath(p, base))
                       for p in sorted(glob(os.path.join(base, pattern)))]
    for directory in (".claude", ".gemini"):   # scripts without a telling name
        wanted += [(home, os.path.relpath(p, home))
                   for p in sorted(glob(os.path.join(home, directory, "*"))) if is_program(p)]
    mounts, placeholders, pins = [], [], []
    for base, relative in dict.fromkeys(wanted):
        path = os.path.join(base, relative.rstrip("/"))
        root = next((r for r in rw_roots if is_within(path, r) and path != r), None)
        if root is None or (relative.startswith(".git/") and not isdir(os.path.join(base, ".git"))):
            continue
        parts = os.path.relpath(path, root).split("/")
        for n in range(1, len(parts)):
            parent = os.path.join(root, *parts[:n])
            if parent not in pins:
                pins.append(parent)
                if not exists(parent):
                    placeholders.append(parent + "/")
        if not exists(path):
            placeholders.append(path + ("/" if relative.endswith("/") else ""))
        mounts.append(("--ro-bind", path, path))
    return [("--bind", p, p) for p in pins] + mounts, placeholders


def is_program(path):
    """An executable regular file (not a directory, not through a symlink)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)


def depth(mount):
    return mount[2].rstrip("/").count("/")


def inner_command(plan):
    command = list(plan.command)
    if plan.env_program:
        command = [plan.env_program, "--default-signal=INT,QUIT", *command]
    if plan.filter:
        command = ["/bin/sh", SANDBOX_BRIDGE, plan.socat, SANDBOX_SOCKET,
                   " ".join(f"{inside}:{host}" for inside, host in plan.host_ports), *command]
    return command


def namespace_args(disable_userns, unshare_net):
    """The namespaces and privileges of a session (and of --doctor's trial sandbox)."""
    args = ["--die-with-parent", "--unshare-user", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--cap-drop", "ALL"]
    if disable_userns:
        args.append("--disable-userns")
    if unshare_net:
        args.append("--unshare-net")
    return args


def build_bwrap_args(plan, private_dir, status_fd=None, seccomp_fd=None):
    """The bwrap command line.  The environment is not in it: it goes to bwrap as its own
    environment, so API keys never show in `ps`."""
    args = [plan.bwrap, *namespace_args(plan.disable_userns, plan.unshare_net),
            "--hostname", plan.profile.tool]
    for path, link in plan.system:
        args += ["--symlink", link, path] if link else ["--ro-bind", path, path]
    for path in plan.etc:
        args += ["--ro-bind", path, path]
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/var/tmp"]
    mounts = [("--bind", os.path.join(private_dir, "home"), plan.home), *plan.mounts]
    mounts += [("--bind", os.path.join(private_dir, f"guarded.{i}"), path)
               for i, (path, _) in enumerate(plan.guarded)]
    if plan.filter:
        mounts += [("--ro-bind", BRIDGE_SCRIPT, SANDBOX_BRIDGE),
                   ("--ro-bind", os.path.join(private_dir, "proxy.sock"), SANDBOX_SOCKET)]
    # Parents before children, so no mount hides one meant to be on top of it.
    for option, source, dest in sorted(mounts, key=depth):
        if source is None:
            args += [option, dest, "--remount-ro", dest]
        else:
            args += [option, source, dest]
    args += ["--chdir", plan.project]
    if status_fd is not None:
        args += ["--json-status-fd", str(status_fd)]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args + ["--", *inner_command(plan)]


def build_proxy_args(plan, private_dir, ready_fd):
    # -I -S: the proxy needs only the standard library; skipping site-packages and the
    # user's PYTHON* variables saves start-up time and keeps it what this file says.
    args = [sys.executable, "-I", "-S", FILTER_SCRIPT,
            "--listen", os.path.join(private_dir, "proxy.sock")]
    for rule in plan.allow:
        args += ["--allow", rule]
    for path in plan.allow_files:
        args += ["--allow-file", path]
    if plan.allow_private:
        args.append("--allow-private")
    if plan.learn:
        args += ["--mode", "audit"]
    if plan.proxy_token:
        args += ["--token-env", TOKEN_VARIABLE]
    return args + ["--log", plan.proxy_log or os.path.join(private_dir, "proxy.log"),
                   "--ready-fd", str(ready_fd)]


def private_base(environ):
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    return runtime if os.path.isabs(runtime) and os.path.isdir(runtime) else tempfile.gettempdir()


def make_private_dir(base, tool):
    """A 0700 directory for one session, locked for as long as this process lives.

    It is made under a hidden name and renamed once locked, so sweep_stale never sees
    it unlocked.  Returns (path, fd holding the lock).
    """
    hidden = tempfile.mkdtemp(prefix=f".{tool}.", dir=base)
    fd = os.open(hidden, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    path = os.path.join(base, os.path.basename(hidden)[1:])
    os.rename(hidden, path)
    return path, fd


def filter_fd(program):
    """A pipe holding the seccomp program for bwrap --seccomp (it is far below a pipe's size)."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, program)
    os.close(write_fd)
    return read_fd


def placeholder_content(path):
    if path.endswith("/.git/commondir"):
        return PLACEHOLDER_COMMONDIR
    return PLACEHOLDER_JSON if path.endswith(".json") else b""


def remove_placeholders(created):
    """Remove the placeholders this session made, deepest first; any that now holds
    something else is left alone."""
    for path in reversed(created):
        with contextlib.suppress(OSError):
            if path.endswith("/"):
                os.rmdir(path)
            elif read_regular(path) == placeholder_content(path):
                os.unlink(path)


def key_segments(key, project=None):
    """A guarded key ("a.b.c", or ("a.b.c", allowed values)) as (segments, values or None);
    PROJECT_KEY becomes the project's path, which may hold dots."""
    text, values = (key, None) if isinstance(key, str) else key
    return [project if part == PROJECT_KEY else part for part in text.split(".")], values


def dotted(tree, key):
    for part in key.split(".") if isinstance(key, str) else key:
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def set_dotted(tree, key, value):
    *parents, last = key.split(".") if isinstance(key, str) else key
    for part in parents:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    if value is _MISSING:
        tree.pop(last, None)
    else:
        tree[last] = value


def key_paths(trees, segments, prefix=()):
    """The concrete key paths that `segments` (fnmatch patterns, one a level) names in any
    of `trees`."""
    if not segments:
        yield prefix
        return
    pattern, rest = segments[0], segments[1:]
    if pattern is None:
        return
    if any(c in pattern for c in "*?["):
        names = set()
        for tree in trees:
            node = dotted(tree, prefix)
            if isinstance(node, dict):
                names.update(k for k in node if fnmatch.fnmatchcase(k, pattern))
        names = sorted(names)
    else:
        names = [pattern]
    for name in names:
        yield from key_paths(trees, rest, prefix + (name,))


def parse_json(data):
    """JSON written by the sandbox, or None when it is not JSON (or too deep to parse)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def guarded_changes(base, ours, keys, project=None):
    """`base` with only the changes `ours` made to `keys` (see key_segments; a segment may
    be an fnmatch pattern), or None if none or if either is not a JSON object."""
    base_tree, our_tree = parse_json(base or b"{}"), parse_json(ours)
    if not isinstance(base_tree, dict) or not isinstance(our_tree, dict):
        return None
    result = json.loads(json.dumps(base_tree))
    for key in keys:
        segments, values = key_segments(key, project)
        for path in key_paths((base_tree, our_tree), segments):
            value = dotted(our_tree, path)
            if value == dotted(base_tree, path):
                continue
            if values is not None and value is not _MISSING and value not in values:
                continue
            if value is _MISSING and dotted(result, path) is _MISSING:
                continue
            set_dotted(result, path, value)
    if result == base_tree:
        return None
    try:
        return (json.dumps(result, indent=2) + "\n").encode()
    except (ValueError, RecursionError):
        return None


def sweep_stale(base, tool):
    """Remove what sessions killed with SIGKILL left: their directories are no longer locked."""
    for name in os.listdir(base):
        if not name.startswith(tool + "."):
            continue
        path = os.path.join(base, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_uid != os.getuid():
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue
        finally:
            os.close(fd)
        with contextlib.suppress(OSError, ValueError, RecursionError, TypeError):
            with open(os.path.join(path, "placeholders.json")) as f:
                remove_placeholders([p for p in json.load(f) if isinstance(p, str)])
        remove_tree(path)


SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "AUTH", "CREDENTIAL")


def format_env_command(env, argv):
    """`env -i VAR=VALUE... argv`, shell-quoted, with secret-looking values hidden."""
    shown = [f"{k}=<hidden>" if any(w in k.upper() for w in SECRET_WORDS) else f"{k}={v}"
             for k, v in sorted(env.items())]
    return shlex.join(["env", "-i", *shown, *argv])


def printable(text):
    """Text from the proxy log, safe to print on a terminal."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def rules_module():
    """socks_filter, for its pure rule and name functions (never its SOCKS parsing)."""
    try:
        import socks_filter
    except ImportError:
        raise Failure(f"{FILTER_SCRIPT} is missing; keep socks_filter.py next to bw_lib.py") \
            from None
    return socks_filter


def host_port(host, port):
    """host:port, with brackets around an IPv6 address, as rules write it."""
    return rules_module().host_port(str(host), port)


def allow_option(host, port):
    return "--allow-domain " + shlex.quote(host_port(host, port))


def is_ip(text):
    return rules_module().parse_ip_spelling(str(text)) is not None


def is_private_ip(text):
    """An IP address that is not public (loopback, private, link-local, metadata...)."""
    rules = rules_module()
    address = rules.parse_ip_spelling(str(text))
    return address is not None and not rules.is_public_address(address)


def read_records(lines):
    """The proxy log's objects; lines that are not JSON objects are skipped."""
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            yield record


def went_ahead(record):
    """A decision record whose connection the proxy attempted (allowed, or audit mode)."""
    return record.get("event") == "decision" and (
        record.get("decision") == "allow" or record.get("enforced") is False)


@dataclass
class Blocked:
    """One blocked destination in the end-of-session story."""
    host: str
    port: str
    count: int = 0
    reasons: list = field(default_factory=list)   # log reasons, in order seen
    address: str = ""       # the private address a name resolved to ("10.0.0.5:8000")

    @property
    def why(self):
        text = ", ".join(REASONS.get(r, printable(r)) for r in self.reasons)
        return text + (": allow only if you mean it" if is_private_ip(self.host) else "")

    @property
    def option(self):
        """The option that would let it through, or "" when none would: an IP rule for an
        address (a private one is flagged in `why`: allow it only if you mean it); a name
        that resolved to a private address is allowed only by --allow-private, which is
        the user's call and never suggested."""
        if any(r in ALLOWABLE for r in self.reasons) or (
                "private-address" in self.reasons and is_ip(self.host)):
            return allow_option(self.host, self.port)
        return fix_option(self)


def network_story(records):
    """(connections allowed, [Blocked], most first): what the session summary tells.
    A destination is counted once per host:port, whatever the reasons."""
    allowed, blocked = 0, {}
    for record in records:
        if record.get("event") != "decision":
            continue
        if went_ahead(record):
            allowed += 1
            continue
        host, port = printable(record.get("host", "?")), printable(record.get("port", "?"))
        entry = blocked.setdefault((host, port), Blocked(host, port))
        entry.count += 1
        reason = str(record.get("reason", ""))
        if reason not in entry.reasons:
            entry.reasons.append(reason)
        if reason == "private-address" and record.get("address"):
            entry.address = printable(record["address"])
    return allowed, sorted(blocked.values(), key=lambda b: (-b.count, b.host, b.port))


def format_story(tool, allowed, blocked, width=None, failed=(), quiet=(), refused=0):
    """The summary: one line, or with `width` (a terminal's) a small table when it fits."""
    total = sum(b.count for b in blocked)
    head = f"{tool}: network: {allowed} allowed, {total} blocked"
    shown, more = blocked[:SUMMARY_HOSTS], len(blocked) - SUMMARY_HOSTS
    rows = [("blocked", "times", "why", "to allow it")]
    rows += [(host_port(b.host, b.port), str(b.count), b.why, b.option or "-") for b in shown]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  " + "  ".join(cell.rjust(w) if i == 1 else cell.ljust(w)
                              for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    if more > 0:
        lines.append(f"  and {more} more (see --proxy-log)")
    extras = story_extras(failed, quiet, refused)
    if failed:
        head += f", {sum(f.count for f in failed)} failed"
    if blocked and width and max([*map(len, lines), *(len(e) + 2 for e in extras)]) <= width:
        return head + ":\n" + "\n".join(lines + ["  " + e for e in extras])
    items = []
    for b in shown:
        item = host_port(b.host, b.port) + (f" x{b.count}" if b.count > 1 else "")
        items.append(f"{item} ({b.why})" + (f" {b.option}" if b.option else ""))
    if more > 0:
        items.append(f"and {more} more (see --proxy-log)")
    return wrap_words(head + (": " + "; ".join(items + extras) if items or extras else ""), width)


def summarize(tool, lines, width=None, expected=()):
    """The end-of-session summary from the proxy's JSON log lines (so --proxy-log rebuilds it).
    `expected`: the profile's expected_blocked, summed up on one quiet line."""
    records = list(read_records(lines))
    allowed, blocked = network_story(records)
    failed = failed_connections(records)
    blocked, quiet, refused = set_apart(blocked, expected)
    return format_story(tool, allowed - sum(f.count for f in failed), blocked, width,
                        failed=failed, quiet=quiet, refused=refused)


# ---------------------------------------------------------------------------------------------
# The summary's extras: failed connections, what is blocked by design, refused strangers

# Reasons a tunnel to a name was closed that a :PORT/raw rule cures (a client that is not
# TLS, or that waits for the server to speak first); the others look like attacks.
RAW_CURES = {"not-tls", "tls-timeout", "no-sni"}


def fix_option(blocked):
    """The fix for a blocked name that an --allow-domain NAME:PORT would not cure: an IP rule
    for the private address it resolved to (or --allow-private), or a /raw rule."""
    if is_ip(blocked.host):
        return ""
    if "private-address" in blocked.reasons and blocked.address:
        return (f"--allow-domain {shlex.quote(blocked.address)} (only if you mean it) "
                "or --allow-private")
    if blocked.reasons and set(blocked.reasons) <= RAW_CURES:
        return allow_option(blocked.host, blocked.port) + "/raw"
    return ""


@dataclass
class Failed:
    """An allowed destination whose lookup or connect failed, counted apart from "allowed"."""
    host: str
    port: str
    count: int = 0
    reasons: list = field(default_factory=list)

    @property
    def text(self):
        times = f" x{self.count}" if self.count > 1 else ""
        return (host_port(self.host, self.port) + times + " (" +
                ", ".join(REASONS.get(r, printable(r)) for r in self.reasons) + ")")


def failed_connections(records):
    """[Failed], most first, from the close records of allowed connections that never
    connected (the proxy logs them allowed, then closed with a FAILURE_REASONS reason)."""
    failed, failures = {}, rules_module().FAILURE_REASONS
    for record in records:
        reason = str(record.get("reason", ""))
        if record.get("event") != "close" or reason not in failures:
            continue
        host, port = printable(record.get("host", "?")), printable(record.get("port", "?"))
        entry = failed.setdefault((host, port), Failed(host, port))
        entry.count += 1
        if reason not in entry.reasons:
            entry.reasons.append(reason)
    return sorted(failed.values(), key=lambda f: (-f.count, f.host, f.port))


def set_apart(blocked, expected):
    """(blocked to list, [Blocked] the profile expects, connections refused for lacking the
    session's proxy credential): the last two are summed up, not listed as problems."""
    listed, quiet, refused = [], [], 0
    for entry in blocked:
        if entry.reasons == ["proxy-auth"]:
            refused += entry.count
        elif entry.reasons == ["not-in-allowlist"] and \
                host_port(entry.host, entry.port) in expected:
            quiet.append(entry)
        else:
            listed.append(entry)
    return listed, quiet, refused


def story_extras(failed, quiet, refused):
    """The summary's short sentences after the blocked list."""
    extras = []
    if failed:
        extras.append("failed: " + ", ".join(f.text for f in failed[:SUMMARY_HOSTS]))
    if quiet:
        extras.append("blocked by design, as in every session: " + ", ".join(
            host_port(q.host, q.port) + (f" x{q.count}" if q.count > 1 else "") for q in quiet))
    if refused:
        extras.append(f"{refused} connection{'s' if refused > 1 else ''} without this "
                      "session's proxy credential refused (another local user?)")
    return extras


def wrap_words(text, width):
    """`text` on one line, or for a terminal `width` wide, folded between words (a long
    option stays whole) with the continuation lines indented."""
    if not width or len(text) <= width:
        return text
    return textwrap.fill(text, width, subsequent_indent="  ", break_long_words=False,
                         break_on_hyphens=False)


def learned(records):
    """What --learn writes, from the proxy's log: {(host, port): {"count", "reached",
    "protos", "failures", "addresses", "raw"}} for every destination the proxy attempted;
    "reached" counts the connections that got through (a failed one teaches nothing); "raw"
    says a tunnel to that name carried something other than TLS for it."""
    attempts, closes = {}, {}
    for record in records:
        if went_ahead(record):
            attempts[record.get("id")] = record
        elif record.get("event") == "close":
            closes[record.get("id")] = record
    used = {}
    for key, record in attempts.items():
        entry = used.setdefault((str(record.get("host", "")), record.get("port")),
                                {"count": 0, "reached": 0, "protos": set(), "failures": set(),
                                 "addresses": set(), "raw": False})
        entry["count"] += 1
        entry["raw"] = entry["raw"] or record.get("tunnel") == "raw"
        entry["protos"].add(str(record.get("proto", "?")))
        close = closes.get(key, {})
        reason = str(close.get("reason", "closed"))
        if reason in ("closed", "proxy-stopped"):
            entry["reached"] += 1
            entry["addresses"].add(str(close.get("address") or ""))
        else:
            entry["failures"].add(reason)
    return used


def private_addresses(addresses):
    """Of the close records' "address" fields (1.2.3.4:443, [::1]:443), the non-public IPs."""
    ips = [text.rpartition(":")[0].strip("[]") for text in sorted(addresses)]
    return [ip for ip in ips if is_private_ip(ip)]


def format_learned(tool, used, when):
    """The --learn file: one rule a line for every destination reached, sorted, each with a
    comment; what was never reached, or cannot be a rule, stays a comment.  A name that
    reached a private address (learned with --allow-private) says it needs that option too."""
    filters = rules_module()
    rules, notes = [], []
    for (host, port), use in sorted(used.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        rule = host_port(printable(host), printable(port))
        if use.get("raw") and not is_ip(host):      # it saw a stream that was not TLS
            rule += filters.RAW_SUFFIX
        plural = "s" if use["count"] > 1 else ""
        comment = f"{use['count']} connection{plural}: {', '.join(sorted(use['protos']))}"
        if use["failures"]:
            comment += f"; failed: {', '.join(sorted(use['failures']))}"
        private = [] if is_ip(host) else private_addresses(use["addresses"])
        if private:
            comment += f"; reached private {', '.join(private)}: needs --allow-private too"
        if not use["reached"]:
            notes.append(f"# not reached, so not allowed: {rule} ({comment})")
            continue
        try:
            filters.parse_rule(rule)
        except filters.RuleError as error:
            notes.append(f"# cannot be a rule: {rule} ({printable(error)})")
            continue
        rules.append((rule, comment))
    pad = max((len(rule) for rule, _ in rules), default=0)
    lines = [f"# {tool} --learn, {when}: the destinations one session reached.",
             "# Review, then: "
             f"{tool} --filter-network --unshare-net --allow-file THIS-FILE"]
    lines += [f"{rule.ljust(pad)}  # {comment}" for rule, comment in rules] + notes
    return "\n".join(lines) + "\n", len(rules)


_MISSING = object()


def merge_json(base, ours, theirs):
    """Three-way merge of JSON objects, key by key; where both changed a key, ours wins."""
    if not all(isinstance(x, dict) for x in (base, ours, theirs)):
        return ours
    merged = dict(theirs)
    for key in base.keys() | ours.keys():
        b, o = base.get(key, _MISSING), ours.get(key, _MISSING)
        if o == b:
            continue
        if o is _MISSING:
            merged.pop(key, None)
        else:
            merged[key] = merge_json(b, o, theirs.get(key, _MISSING))
    return merged


def merge_state(base, ours, theirs):
    """The bytes to write back for a state file, or None to leave the host's alone."""
    if ours is None or ours == base:
        return None
    if theirs == base:
        return ours
    parsed = [parse_json(x) if x is not None else {} for x in (base, ours, theirs)]
    if any(x is None for x in parsed):
        return ours
    return (json.dumps(merge_json(*parsed), indent=2) + "\n").encode()


def read_regular(path):
    """A regular file's bytes (never following a symlink placed by the sandbox), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not (info.st_mode & 0o170000 == 0o100000) or info.st_size > STATE_FILE_LIMIT:
            return None
        return f.read(STATE_FILE_LIMIT)


def take_lock(lock):
    """mkdir-style lock shared with Claude; a lock older than 10 s is stale."""
    for _ in range(100):
        try:
            os.mkdir(lock)
            return True
        except FileExistsError:
            try:
                if time.time() - os.stat(lock).st_mtime > 10:
                    return False
            except OSError:
                continue
            time.sleep(0.05)
        except OSError:
            return False
    return False


def write_back(path, base, ours):
    target = os.path.realpath(path)
    locked = take_lock(target + ".lock")
    try:
        theirs = read_regular(target)
        data = merge_state(base, ours, theirs)
        if data is None:
            return
        try:
            mode = os.stat(target).st_mode & 0o777
        except OSError:
            mode = 0o600
        tmp = f"{target}.tmp.{os.getpid()}.bw"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    finally:
        if locked:
            os.rmdir(target + ".lock")


def stop(process, sig=signal.SIGTERM):
    """Signal a child and reap it, bounded; SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def read_ready(fd, seconds):
    """The proxy's ready line, or what it wrote before closing or the time running out."""
    data, deadline = b"", time.monotonic() + seconds
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return printable(lines[-1]) if lines else ""


def bwrap_ran(status):
    """Whether bwrap got as far as running the command (its status fd says how it exited)."""
    return b'"exit-code"' in status


def write_out(text, stream=None):
    """A line on stdout (or `stream`) whatever its encoding: a path that is not valid in it
    goes out as its bytes (the shell-quoted commands of --dry-run stay exact)."""
    stream = stream or sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        data = (text + "\n").encode(encoding, "surrogateescape")
    except UnicodeEncodeError:
        data = (text + "\n").encode(encoding, "backslashreplace")
    if not hasattr(stream, "buffer"):
        stream.write(data.decode(encoding, "replace"))
        return
    stream.flush()
    stream.buffer.write(data)
    stream.buffer.flush()


def say(text):
    """A line on stderr, which may be a terminal that is gone (SIGHUP)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        write_out(text, sys.stderr)


def remove_tree(path):
    """rmtree that also removes what the sandbox made unwritable (chmod 500 on a directory):
    on a failure the directory concerned is made 0700 and the removal tried again, once
    for each path."""
    tried = set()

    def retry(function, failed, _info):
        if failed in tried:
            return
        tried.add(failed)
        with contextlib.suppress(OSError):
            parent = os.path.dirname(failed)
            if is_within(parent, path):
                os.chmod(parent, 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
                shutil.rmtree(failed, onerror=retry)
            else:
                function(failed)

    with contextlib.suppress(OSError):
        shutil.rmtree(path, onerror=retry)
    if os.path.lexists(path):       # a directory emptied late by a retry
        shutil.rmtree(path, ignore_errors=True)


def could_be_made(path, error):
    """Whether the sandbox could create `path` although we failed to: not when the
    filesystem is read-only, the parent is not a directory (it is pinned), or the nearest
    existing directory is someone else's and not writable (no chmod can open it)."""
    import errno
    if error.errno in (errno.EROFS, errno.ENOTDIR):
        return False
    parent = os.path.dirname(path.rstrip("/"))
    while not os.path.lexists(parent) and parent != "/":
        parent = os.path.dirname(parent)
    try:
        owner = os.stat(parent).st_uid
    except OSError:
        return True
    return owner == os.geteuid() or os.access(parent, os.W_OK)


class Session:
    """One sandboxed run: private directory, proxy, bwrap; `with` guarantees the clean-up."""

    def __init__(self, plan, environ):
        self.plan, self.environ = plan, environ
        self.dir = self.proxy = self.bwrap = None
        self.set_up = False          # bwrap ran the command (a session that did not
                                     # leaves an earlier --learn file alone)
        self.snapshots = {}
        self.created = []
        self.guarded_bases = []
        self.tool = plan.profile.tool

    def __enter__(self):
        self.dir, self.lock_fd = make_private_dir(private_base(self.environ), self.tool)
        os.mkdir(os.path.join(self.dir, "home"), 0o700)
        return self

    def __exit__(self, *exc_info):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        try:
            try:
                stop(self.bwrap)
                stop(self.proxy)
            finally:
                # First, and whatever happens next: a placeholder left behind would stay.
                remove_placeholders(self.created)
            try:
                self.save_state()
            except (OSError, ValueError, RecursionError) as error:
                say(f"{self.tool}: could not save {self.plan.profile.name}'s state: "
                    f"{printable(error)}")
            if self.proxy is not None and self.bwrap is not None:
                say(self.summary())
                if self.plan.learn and (self.set_up or isinstance(exc_info[1], Terminated)):
                    say(self.write_learned())
        finally:
            remove_tree(self.dir)
            os.close(self.lock_fd)
        return False

    def home_path(self, relative):
        return os.path.join(self.dir, "home", relative)

    def make_placeholders(self):
        """Create the missing protected paths (empty), noting them so clean-up, or the
        next run's sweep after a SIGKILL, removes them.  One that cannot be made is a
        protection that would be lost: refuse to start (fail closed)."""
        with open(os.path.join(self.dir, "placeholders.json"), "w") as f:
            json.dump(self.plan.placeholders, f)
        for path in self.plan.placeholders:
            try:
                if path.endswith("/"):
                    os.mkdir(path, 0o755)
                else:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    with os.fdopen(fd, "wb") as f:
                        f.write(placeholder_content(path))
            except FileExistsError:
                continue
            except OSError as error:
                if not could_be_made(path, error):
                    # Nor can the sandbox make it: its mount goes, and nothing is lost.
                    self.plan.mounts = [m for m in self.plan.mounts
                                        if not is_within(m[2], path.rstrip("/"))]
                    continue
                raise Failure(f"cannot hold {path.rstrip('/')} read-only for the session "
                              f"({error.strerror}); make its directory writable, or run with "
                              "--allow-config-writes to go without that protection") from None
            self.created.append(path)

    def load_state(self):
        for relative in self.plan.profile.state_dirs:
            os.makedirs(os.path.join(self.plan.home, relative), 0o700, exist_ok=True)
        for relative, _ in self.plan.profile.state_files:
            # A dotfile manager's symlink is followed on the host side only.
            host = os.path.realpath(os.path.join(self.plan.home, relative))
            data = read_regular(host)
            self.snapshots[relative] = (host, data)
            if data is not None:
                fd = os.open(self.home_path(relative), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
        for i, (path, _) in enumerate(self.plan.guarded):
            data = read_regular(path)
            self.guarded_bases.append(data)
            with open(os.path.join(self.dir, f"guarded.{i}"), "wb") as f:
                f.write(PLACEHOLDER_JSON if data is None else data)

    def save_state(self):
        """Merge back what the sandbox may change: the allowed keys of state files and of
        guarded settings, nothing else."""
        project = self.plan.project
        for relative, keys in self.plan.profile.state_files:
            host, base = self.snapshots.get(relative, (None, None))
            if host is None:
                continue
            ours = read_regular(self.home_path(relative))
            changed = guarded_changes(base, ours, keys, project) if ours is not None else None
            if changed is not None:
                write_back(host, base, changed)
        for i, ((path, keys), base) in enumerate(zip(self.plan.guarded, self.guarded_bases)):
            ours = read_regular(os.path.join(self.dir, f"guarded.{i}"))
            changed = guarded_changes(base, ours, keys, project) if ours is not None else None
            if changed is not None:
                write_back(path, base, changed)

    def launch_proxy(self):
        """Start the proxy; the caller prepares the rest meanwhile, then awaits it."""
        read_fd, write_fd = os.pipe()
        args = build_proxy_args(self.plan, self.dir, write_fd)
        if self.plan.verbose:
            say(shlex.join(args))
        try:
            with open(os.path.join(self.dir, "proxy.err"), "wb") as err:
                # Its own session: the terminal's Ctrl-C is for the CLI, not for the proxy.
                self.proxy = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                    pass_fds=(write_fd,), start_new_session=True, env=proxy_env(self.plan))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.proxy_ready_fd = read_fd

    def await_proxy(self):
        """Wait (bounded) for the proxy's ready line; no sandbox starts without it."""
        try:
            line = read_ready(self.proxy_ready_fd, PROXY_READY_SECONDS)
        finally:
            os.close(self.proxy_ready_fd)
        if not line.startswith("ready"):
            why = (last_line(os.path.join(self.dir, "proxy.err"))
                   or f"no ready line within {PROXY_READY_SECONDS} s")
            raise Failure(f"the filtering proxy did not start: {why}")

    def run(self):
        if self.plan.filter:
            self.launch_proxy()      # its start-up overlaps the preparations below
        self.load_state()
        self.make_placeholders()
        if self.plan.filter:
            self.await_proxy()
            for line in network_warnings(self.plan):
                say(f"{self.tool}: {line}")
            if not self.plan.unshare_net:
                say(f"{self.tool}: --filter-network --share-net is advisory: programs that "
                    "ignore HTTP(S)_PROXY reach the network directly")
        read_fd, write_fd = os.pipe()
        seccomp_fd = filter_fd(self.plan.seccomp)
        args = build_bwrap_args(self.plan, self.dir, write_fd, seccomp_fd)
        if self.plan.verbose:
            say(format_env_command(self.plan.env, args))
        # bwrap dies on SIGINT and SIGQUIT (Ctrl-C, Ctrl-\) and takes the sandbox with it:
        # it must ignore them, and the CLI gets them back through env --default-signal.
        # Without that env, bwrap keeps the defaults so they at least end the session.
        # The wrapper ignores them from here on: its clean-up runs when bwrap ends.
        keyboard = (signal.SIGINT, signal.SIGQUIT)
        if self.plan.env_program:
            for sig in keyboard:
                signal.signal(sig, signal.SIG_IGN)
        try:
            self.bwrap = subprocess.Popen(args, env=self.plan.env, pass_fds=(write_fd, seccomp_fd))
        finally:
            os.close(write_fd)
            os.close(seccomp_fd)
            for sig in keyboard:
                signal.signal(sig, signal.SIG_IGN)
        with os.fdopen(read_fd, "rb") as status_pipe:
            code = self.bwrap.wait()
            self.set_up = bwrap_ran(status_pipe.read())
        if not self.set_up:
            raise Failure("bwrap could not set up the sandbox (its message is above); if it is "
                          "about permissions or the uid map, check that unprivileged user "
                          "namespaces are allowed (sysctl "
                          "kernel.unprivileged_userns_clone, and on Ubuntu 24.04 "
                          "kernel.apparmor_restrict_unprivileged_userns or an AppArmor profile "
                          "for bwrap)", code or 1)
        return 128 - code if code < 0 else code

    def log_path(self):
        return self.plan.proxy_log or os.path.join(self.dir, "proxy.log")

    def summary(self):
        try:
            with open(self.log_path(), errors="replace") as f:
                text = summarize(self.tool, f, terminal_width(sys.stderr),
                                 self.plan.profile.expected_blocked)
        except OSError:
            text = f"{self.tool}: network: no proxy log"
        if self.proxy.returncode not in (0, -signal.SIGTERM):
            text += f" (the proxy exited with status {self.proxy.returncode}: " \
                    f"{last_line(os.path.join(self.dir, 'proxy.err'))})"
        return text

    def write_learned(self):
        """Write the --learn file (atomically: a partial one would be a wrong allow list)."""
        target = self.plan.learn
        try:
            with open(self.log_path(), errors="replace") as f:
                used = learned(read_records(f))
            when = time.strftime("%Y-%m-%d %H:%M %Z")
            text, count = format_learned(self.tool, used, when)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.",
                                       dir=os.path.dirname(target))
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as error:
            return f"{self.tool}: learn: could not write {target}: {error}"
        plural = "" if count == 1 else "s"
        return (f"{self.tool}: learn: wrote {count} destination{plural} to {target}; review it, "
                f"then use --filter-network --unshare-net --allow-file {shlex.quote(target)}")


# ---------------------------------------------------------------------------------------------
# Network options: host ports, the advisory bridge's credential, hints

TOKEN_VARIABLE = "BW_PROXY_TOKEN"   # the proxy's password, in the proxy's and the bridge's
                                    # environment (never on a command line, where ps shows it)
LOOPBACKS = ("127.0.0.1", "::1")    # the sandbox's own loopback inside --unshare-net


def host_ports(opts, given):
    """--host-port PORT[:HOSTPORT] values as [(inside port, host port)].  [] in a session
    without the filter or with the host's network shared (where 127.0.0.1 already is the
    host's); an error there when the command line, not the defaults file, gave them."""
    if not (opts.filter_network and opts.unshare_net):
        if given.host_port and opts.filter_network:
            raise Failure("--host-port needs --unshare-net (with --share-net the host's "
                          "127.0.0.1 is already reachable)", 2)
        return []
    pairs = []
    for text in opts.host_port:
        inside, colon, host = text.partition(":")
        ports = [inside, host if colon else inside]
        if not all(p.isdigit() and p == str(int(p)) and 1 <= int(p) <= 65535 for p in ports):
            raise Failure(f"--host-port {text!r}: expected PORT or PORT:HOSTPORT, "
                          "ports 1-65535", 2)
        if any(int(inside) == seen for seen, _ in pairs):
            raise Failure(f"--host-port {text!r}: port {inside} is already mapped", 2)
        pairs.append((int(inside), int(ports[1])))
    return pairs


def host_port_rule(port):
    """The exact IP rule that lets the proxy reach the host's 127.0.0.1:PORT."""
    return f"127.0.0.1:{port}"


def advisory_token(opts):
    """A fresh random password for the proxy when its bridge listens on the host's loopback
    (--filter-network --share-net), where every local user could use it; else None."""
    if opts.filter_network and not opts.unshare_net:
        return secrets.token_urlsafe(24)
    return None


def with_token(env, token):
    return {**env, TOKEN_VARIABLE: token} if token else env


def proxy_env(plan):
    """The proxy's environment: the wrapper's, plus the password when there is one."""
    return with_token(dict(os.environ), plan.proxy_token)


def loopback_hints(allow):
    """For each rule naming the sandbox's own 127.0.0.1 or ::1 (inside --unshare-net, where
    NO_PROXY keeps them away from the proxy anyway): a hint pointing at --host-port."""
    rules, hints = rules_module(), []
    for text in allow:
        try:
            rule = rules.parse_rule(text)
        except rules.RuleError:
            continue
        if rule.kind != "ip":
            continue
        if any(rule.matches_address(rules.parse_ip_spelling(a), rule.port or 1) for a in LOOPBACKS):
            port = rule.port or "PORT"
            hints.append(f"hint: --allow-domain {text} names the sandbox's own loopback; for a "
                         f"service on the host's 127.0.0.1:{port} use --host-port {port}")
    return hints


def network_checks(opts):
    """--doctor's lines about the network options in force (from the defaults file)."""
    if not opts.unshare_net:
        return [Check("network", "note", "--filter-network --share-net is advisory: programs "
                      "that ignore the proxy variables go around it; the bridge on the host's "
                      "127.0.0.1 asks every client for a per-session credential",
                      "drop --share-net: --filter-network alone is enforced")]
    checks = [Check("network", "ok", "--filter-network: enforced (an empty network namespace, "
                    "the proxy is the only way out)")]
    checks += [Check("host port", "ok", f"127.0.0.1:{inside} inside is the host's "
                     f"127.0.0.1:{host}, through the proxy") for inside, host in opts.host_port]
    return checks + [Check("allow list", "note", hint) for hint in loopback_hints(opts.allow_domain)]


def network_warnings(plan):
    """The loud lines at start for the options that open the network."""
    lines = []
    if plan.learn:
        lines.append("learn mode: the network is OPEN to every " +
                     ("address, private ones included (--allow-private)" if plan.allow_private
                      else "public address (private addresses stay blocked)") +
                     f"; the destinations used go to {plan.learn} at exit")
    elif plan.allow_private:
        lines.append("--allow-private: allowed names may reach loopback and private addresses")
    if plan.unshare_net:
        own = {host_port_rule(host) for _, host in plan.host_ports}
        lines += loopback_hints([r for r in plan.allow[len(plan.profile.allow):] if r not in own])
    return lines


def terminal_width(stream):
    """The terminal's width when `stream` is one, else None."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else None
    except (OSError, ValueError, AttributeError):
        return None


def describe(plan):
    """--verbose: the decisions, one per line."""
    net = ("learning: open, audited" if plan.learn else
           "filtered, enforced" if plan.filter and plan.unshare_net else
           "filtered, advisory (the proxy wants a per-session credential)" if plan.filter else
           "none" if plan.unshare_net else "host network")
    lines = [f"profile: {plan.profile.name}", f"project: {plan.project}",
             f"command: {shlex.join(plan.command)}", f"network: {net}"]
    if plan.filter:
        lines.append(f"allow: {' '.join(plan.allow)}")
        if plan.allow_private:
            lines.append("private addresses: reachable by allowed names (--allow-private)")
        lines += [f"allow file: {p}" for p in plan.allow_files]
        lines += [f"host port: 127.0.0.1:{inside} inside is the host's 127.0.0.1:{host}"
                  for inside, host in plan.host_ports]
    lines += [" ".join(x for x in mount if x) for mount in plan.mounts]
    if not plan.sockets_complete:
        lines.append(f"unix sockets, nested repositories: the search below the shown and "
                     f"writable directories stopped at {SOCKET_WALK_ENTRIES} entries or "
                     f"{SOCKET_WALK_DEPTH} levels; what is beyond it is not covered")
    lines.append("Ctrl-C reaches the CLI: " + ("yes" if plan.env_program else
                 "no, env(1) lacks --default-signal; Ctrl-C ends the session"))
    lines.append("keystroke injection (ioctl TIOCSTI, TIOCLINUX): blocked by a seccomp filter")
    lines.append("nested user namespaces: " + ("blocked (--disable-userns)" if plan.disable_userns
                 else "possible: this bwrap lacks --disable-userns (bubblewrap >= 0.8)"))
    return "\n".join(f"{plan.profile.tool}: {line}" for line in lines)


def check_tools(plan):
    if not os.path.isabs(plan.bwrap):
        raise Failure("bwrap not found; install it: sudo apt-get install bubblewrap", 127)
    if plan.filter:
        if not os.path.isabs(plan.socat):
            raise Failure("socat not found (--filter-network needs it); install it: "
                          "sudo apt-get install socat", 127)
        for path in (FILTER_SCRIPT, BRIDGE_SCRIPT):
            if not os.path.isfile(path):
                raise Failure(f"{path} is missing; keep {os.path.basename(path)} next to bw_lib.py")


def run(profile, argv, environ=None, skip=()):
    environ = dict(os.environ if environ is None else environ)
    ours = split_argv(argv)[0]
    if not any(flag in ours for flag in ("--help", "-h", "--list-presets")):
        environ["HOME"] = checked_home(environ)
    if "--doctor" in ours:
        return doctor(profile, argv, environ, skip)
    # --help works even when the defaults file does not parse.
    skip_defaults = any(flag in ours for flag in ("--no-defaults", "--help", "-h"))
    defaults = [] if skip_defaults else read_defaults(profile, environ)
    opts = parse_args(profile, argv, defaults)
    if opts.list_presets:
        sys.stdout.write(format_presets())
        return 0
    if not opts.dry_run:
        sweep_stale(private_base(environ), profile.tool)
    plan = make_plan(profile, opts, environ, skip)
    tool = profile.tool
    if plan.verbose:
        if defaults:
            say(f"{tool}: defaults: {shlex.join(defaults)}")
        say(describe(plan))
    if plan.dry_run:
        private_dir = os.path.join(private_base(environ), tool + ".XXXXXXXX")
        if plan.filter:
            write_out(shlex.join(build_proxy_args(plan, private_dir, "FD")))
        write_out(format_env_command(plan.env, build_bwrap_args(plan, private_dir, seccomp_fd="FD")))
        return 0
    check_tools(plan)
    with Session(plan, environ) as session:
        return session.run()


@dataclass
class Check:
    """One line of --doctor: what was looked at, "ok", "note" or "FAIL", and how to fix it."""
    name: str
    status: str
    text: str
    fix: str = ""


def run_briefly(args, seconds, env=None, pass_fds=()):
    """(exit status, output) of a short command; (None, why) if it cannot start or hangs."""
    try:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds,
                                   start_new_session=True)
    except OSError as error:
        return None, str(error)
    try:
        output = process.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None, f"no answer within {seconds} s"
    return process.returncode, output.decode(errors="replace")


def first_line(text, containing=""):
    lines = [line.strip() for line in text.splitlines() if containing in line and line.strip()]
    return printable(lines[0]) if lines else ""


def last_words(output, code):
    """What a failed command said last, or its status."""
    lines = output.strip().splitlines()
    return printable(lines[-1].strip()) if lines else f"exit status {code}"


USERNS_SYSCTLS = ("kernel.apparmor_restrict_unprivileged_userns",
                  "kernel.unprivileged_userns_clone", "user.max_user_namespaces")


def read_sysctls(names):
    values = {}
    for name in names:
        with contextlib.suppress(OSError):
            with open("/proc/sys/" + name.replace(".", "/")) as f:
                values[name] = f.read().strip()
    return values


def userns_fix(sysctls):
    """How to get unprivileged user namespaces, from the kernel settings that forbid them."""
    if sysctls.get("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return ("AppArmor forbids unprivileged user namespaces (Ubuntu 23.10 and later): give "
                "bwrap a profile: printf 'abi <abi/4.0>,\\ninclude <tunables/global>\\nprofile "
                "bwrap /usr/bin/bwrap flags=(unconfined) {\\n  userns,\\n}\\n' | sudo tee "
                "/etc/apparmor.d/bwrap && sudo apparmor_parser -r /etc/apparmor.d/bwrap  (or, "
                "for every program: sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0)")
    if sysctls.get("kernel.unprivileged_userns_clone") == "0":
        return "sudo sysctl kernel.unprivileged_userns_clone=1"
    if sysctls.get("user.max_user_namespaces") == "0":
        return "sudo sysctl user.max_user_namespaces=15000"
    return ("bwrap needs unprivileged user namespaces; in a container, allow them (for "
            "Docker: --security-opt seccomp=unconfined --security-opt apparmor=unconfined) or "
            "run on the host")


def trial_args(bwrap, disable_userns, seccomp_fd=None):
    """A trivial sandbox with the namespaces a session uses, for --doctor to try."""
    args = [bwrap, *namespace_args(disable_userns, True),
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args + ["--", "/bin/sh", "-c", "exit 0"]


def tiocsti_check(value):
    """The kernel's legacy_tiocsti switch, read as a Check (the seccomp filter blocks TIOCSTI
    in the sandbox either way)."""
    if value == "0":
        return Check("TIOCSTI", "ok", "the kernel refuses it to everyone (dev.tty.legacy_tiocsti=0)")
    text = ("the kernel allows it (dev.tty.legacy_tiocsti=1); the sandbox's seccomp filter "
            "blocks it" if value == "1" else
            "this kernel (before 6.2) has no switch; the sandbox's seccomp filter blocks it")
    return Check("TIOCSTI", "note", text, "for every program: sudo sysctl dev.tty.legacy_tiocsti=0"
                 if value == "1" else "")


def rule_problems(rules=(), files=()):
    """(how many rules parse, ["where: why" for each that does not]): --allow-domain rules
    one by one, allow files through socks_filter.read_rule_file (its first error a file)."""
    filters = rules_module()
    count, problems = 0, []
    for rule in rules:
        try:
            filters.parse_rule(rule)
            count += 1
        except filters.RuleError as error:
            problems.append(f"--allow-domain {printable(rule)}: {printable(error)}")
    for path in files:
        try:
            count += len(filters.read_rule_file(path))
        except filters.RuleError as error:
            problems.append(printable(error))
    return count, problems


def allow_list_checks(profile, opts, environ):
    checks, files = [], []
    user_file = config_path(environ, profile.tool, "allowed-domains")
    files += [user_file] if os.path.isfile(user_file) else []
    for path in opts.allow_file:
        if os.path.isfile(path):
            files.append(path)
        else:
            checks.append(Check("allow list", "FAIL", f"--allow-file {path}: no such file",
                                "give the path of an existing file"))
    sources = [(path, (), [path]) for path in files]
    if opts.allow_domain:
        sources.append(("--allow-domain", opts.allow_domain, []))
    for where, rules, paths in sources:
        count, problems = rule_problems(rules, paths)
        if problems:
            checks += [Check("allow list", "FAIL", problem, "correct or remove that rule "
                             "(see socks_filter.py's docstring: RULES)") for problem in problems]
        else:
            checks.append(Check("allow list", "ok", f"{where}: {count} rules"))
    if not sources and not opts.allow_preset:
        checks.append(Check("allow list", "ok", f"only {profile.name}'s API (no {user_file}, "
                                                "no --allow-file)"))
    if opts.allow_preset:
        checks.append(Check("allow list", "ok", "presets: " + ", ".join(opts.allow_preset)))
    return checks


def host_checks(profile, opts, environ, skip=()):
    """Everything --filter-network --unshare-net needs from this machine, as Checks."""
    search_path = environ.get("PATH", os.defpath)
    home = environ.get("HOME", "")
    checks, userns = [], False
    bwrap = shutil.which("bwrap", path=search_path)
    disable_userns = bool(bwrap) and bwrap_supports(bwrap, "--disable-userns")
    if bwrap is None:
        checks.append(Check("bwrap", "FAIL", "not found on PATH",
                            "sudo apt-get install bubblewrap  (Fedora: sudo dnf install bubblewrap)"))
    else:
        version = first_line(run_briefly([bwrap, "--version"], 10)[1]) or "version unknown"
        checks.append(Check("bwrap", "ok", f"{version} ({bwrap})"))
        if not disable_userns:
            checks.append(Check("nested userns", "note", "this bwrap lacks --disable-userns, so "
                                "the sandbox could make namespaces of its own",
                                "bubblewrap 0.8 or later"))
        code, output = run_briefly(trial_args(bwrap, disable_userns), 10,
                                   env={"PATH": "/usr/bin:/bin"})
        userns = code == 0
        checks.append(Check("user namespaces", "ok",
                            "a trial sandbox ran (user, pid, ipc, uts and net namespaces)")
                      if userns else
                      Check("user namespaces", "FAIL", "a trial sandbox failed: " +
                            last_words(output, code), userns_fix(read_sysctls(USERNS_SYSCTLS))))
    machine = os.uname().machine
    try:
        program = tiocsti_filter(machine)
    except Failure as error:
        checks.append(Check("seccomp", "FAIL", str(error), "run on x86_64 or aarch64"))
    else:
        if not userns:
            checks.append(Check("seccomp", "FAIL", f"untested: no working bwrap ({machine} "
                                "is supported)", "fix bwrap first"))
        else:
            fd = filter_fd(program)
            try:
                code, output = run_briefly(trial_args(bwrap, disable_userns, fd), 10,
                                           env={"PATH": "/usr/bin:/bin"}, pass_fds=(fd,))
            finally:
                os.close(fd)
            checks.append(Check("seccomp", "ok", f"the keystroke-injection filter loads ({machine})")
                          if code == 0 else
                          Check("seccomp", "FAIL", "bwrap refused the filter: " +
                                last_words(output, code),
                                "a kernel with CONFIG_SECCOMP_FILTER"))
    legacy = read_sysctls(["dev.tty.legacy_tiocsti"]).get("dev.tty.legacy_tiocsti")
    checks.append(tiocsti_check(legacy))
    socat = shutil.which("socat", path=search_path)
    if socat is None:
        checks.append(Check("socat", "FAIL", "not found on PATH (--filter-network needs it)",
                            "sudo apt-get install socat  (Fedora: sudo dnf install socat)"))
    else:
        version = first_line(run_briefly([socat, "-V"], 10)[1], "socat version")
        checks.append(Check("socat", "ok", f"{version or 'version unknown'} ({socat})"))
    for path in (FILTER_SCRIPT, BRIDGE_SCRIPT):
        if not os.path.isfile(path):
            checks.append(Check("proxy", "FAIL", f"{path} is missing",
                                f"keep {os.path.basename(path)} next to bw_lib.py"))
    cli = find_cli(profile, search_path, home, skip)
    if cli is None:
        checks.append(Check(profile.name, "FAIL", f"not found (looked in {cli_places(profile)})",
                            profile.install_hint))
    else:
        code, output = run_briefly([cli, "--version"], 20, env=dict(environ))
        checks.append(Check(profile.name, "ok", f"{first_line(output)} ({cli})") if code == 0 else
                      Check(profile.name, "FAIL", f"{cli} --version failed: "
                            f"{last_words(output, code)}",
                            f"reinstall it: {profile.install_hint}"))
    for helper in profile.helpers:
        if find_program(helper, search_path) is None:
            checks.append(Check(helper, "FAIL", f"not found on PATH; {profile.name} needs it",
                                f"install {helper}"))
    env_program = shutil.which("env", path="/usr/bin:/bin")
    if not (env_program and env_resets_signals(env_program)):
        checks.append(Check("Ctrl-C", "note", "env(1) lacks --default-signal: Ctrl-C ends the "
                            "whole session instead of reaching the CLI", "coreutils 8.31 or later"))
    try:
        checks += allow_list_checks(profile, opts, environ)
    except Failure:
        checks.append(Check("allow list", "FAIL", "cannot check rules without socks_filter.py",
                            "keep socks_filter.py next to bw_lib.py"))
    return checks


def format_doctor(tool, checks):
    """The --doctor report: a line a check, its fix below when it failed."""
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"  {check.status:<5} {check.name:<{width}}  {check.text}")
        if check.fix:
            label = "fix" if check.status == "FAIL" else "tip"
            lines.append(f"  {'':<5} {'':<{width}}  {label}: {check.fix}")
    failed = sum(c.status == "FAIL" for c in checks)
    lines.append(f"{tool}: " + (f"{failed} problem{'s' if failed > 1 else ''}: "
                                "--filter-network --unshare-net will not work until "
                                f"{'they are' if failed > 1 else 'it is'} fixed" if failed else
                                "everything --filter-network --unshare-net needs works"))
    return "\n".join(lines)


def doctor(profile, argv, environ, skip=()):
    """--doctor: check this machine and the user's configuration; 0 when all needed works."""
    checks, defaults = [], []
    if "--no-defaults" not in split_argv(argv)[0]:
        try:
            defaults = read_defaults(profile, environ)
        except Failure as error:
            checks.append(Check("defaults", "FAIL", str(error), "correct or remove that line"))
        if defaults:
            checks.append(Check("defaults", "ok", shlex.join(defaults)))
    opts = parse_args(profile, ["--filter-network", *argv], defaults)
    checks += host_checks(profile, opts, environ, skip)
    checks += network_checks(opts)
    write_out(format_doctor(profile.tool, checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def raise_terminated(signum, frame):
    raise Terminated(signum)


def main(name):
    """Entry point of bw-claude and bw-gemini."""
    profile = PROFILES[name]
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, raise_terminated)
    entry = os.path.realpath(sys.argv[0])
    try:
        code = run(profile, sys.argv[1:], skip=(entry,))
    except Failure as failure:
        say(f"{profile.tool}: error: {failure}")
        code = failure.code
    except Terminated as terminated:
        code = 128 + terminated.signum
    except KeyboardInterrupt:
        code = 130
    except OSError as error:
        say(f"{profile.tool}: error: {printable(error)}")
        code = 1
    except Exception as error:  # the last resort: one line, never a traceback
        say(f"{profile.tool}: error: unexpected {type(error).__name__}: {printable(error)}")
        code = 1
    sys.exit(code)
