"""Run an AI coding CLI inside a bubblewrap sandbox, optionally with filtered network.

This module is all the logic of bw-claude and bw-gemini; each entry script names its
profile and spells out one session's life with what this module offers: Wrapper (errors,
signals, the terminal, the exit status), plan_session, SessionDirs, FilterProxy and
run_sandbox (the section "Runtime").  Python 3.10 or later (os.splice), standard library
only.  Its sections, in reading order: constants and errors, records, CLI profiles, the
sandbox's layout, options, host facts, filesystem helpers, mount planning, protected paths,
the wrapper's own places, the allow list, the plan, commands, CLI state, network summary,
git guard, runtime, doctor, entry point.

What the sandbox sees
    /usr, /bin, /sbin, /lib*, /opt   read-only, laid out as on the host
    /etc                             only what name resolution, TLS, users, locale,
                                     time zone and /etc/alternatives need
    /dev, /proc                      fresh and minimal
    /tmp, /var/tmp                   private, empty, gone when the session ends
    $HOME                            a private, empty directory for this session (on disk,
                                     below ~/.cache/TOOL: session_base), with:
        the CLI's state (~/.claude/, ~/.gemini/)     the session's own copy, seeded
            from the host's by the profile's State items; at exit only what
            FLOWS_BACK accepts goes back (the "CLI state" section)
        tool directories (.cargo, .nvm, .local/bin, .gitconfig...)  read-only
        the CLI's install, wherever it is                        read-only
    the project directory (--dir)    read-write, the working directory
    /var/cache/bw                    the session's caches (CACHE_ENV points npm, pip, yarn,
                                     pnpm, bun, go and cargo there), on disk, its own
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
  directory: all stay read-only although their parent is writable (PROTECTED_*).  A
  missing one is held by an empty placeholder ({} for .json, "." for commondir), so it
  cannot be created, removed when the last session of that directory ends (or by the
  next start after a SIGKILL: per-root flocks in LOCKS_DIR); the directories between it
  and the project are bound onto themselves, so `mv .git elsewhere` fails (a mount point
  cannot be renamed).  All of these, and every other mount source below a writable
  directory, are reached without following a link and bound through the descriptor that
  was checked; a link there (planted by an earlier session) stops the session with one
  line.  The proxy log and the --learn file are never written through a link.  A
  placeholder that cannot be made where the sandbox could make the file (a directory of
  ours, mode 555) stops the session: protection is never dropped silently.  The CLI's
  state needs none of this: it is the session's own copy, and of its settings files only
  changes to the profile's guarded keys (model, the accepted bypass-permissions prompt,
  Gemini's trust for this project...) go back; hooks, env, permissions and helpers never
  do.  --allow-config-writes turns all of this off (and binds the host's state directory
  read-write).
  Repositories the session made, and config or hooks it changed in repositories the
  protection did not reach, are set aside at its end (the git guard, below).
  Not contained: files of the project itself (.env, Makefile, package.json
  scripts...) that tools run.

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
  A private directory (mode 0700, under $XDG_RUNTIME_DIR when set) holds only the unix
  socket of socks_filter.py, started for this session with the profile's allow list.
  The wrapper binds the socket, so the sandbox starts without waiting for the proxy
  (connections wait in the socket's backlog), and hands it to the proxy, keeping no copy,
  when a connection waits or after PROXY_HAND_SECONDS (the proxy's start then competes
  with nothing); a proxy that dies takes the socket along (connections refused, never let
  through), and one that fails to start (or says nothing for PROXY_READY_SECONDS after
  the hand) ends the session.
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
  Every session has a private directory on disk (~/.cache/TOOL/TOOL.XXXXXXXX, mode 0700,
  under an absolute $XDG_CACHE_HOME when set; the runtime directory when it cannot be
  made) holding its home, caches, copies of guarded files and the proxy's log.  Both are
  locked while the session lives; a run after one killed with SIGKILL removes them.
  NODE_USE_ENV_PROXY=1 is set, so Node's fetch() uses the proxy where Node honours it
  (22.21, 24 and later; --doctor says).

The allow list
  The profile's API hosts, then --allow-preset lists, --allow-domain rules,
  ~/.config/TOOL/allowed-domains and --allow-file files (one rule a line, # comments),
  read once by the wrapper (so a pipe works) and handed to the proxy as rules; a file the
  sandbox can write, or a link there (the project, --allow-rw, the CLI's state), is
  refused: an earlier session could have widened this one's network.
  The rule syntax is socks_filter.py's: example.com, *.example.com, 1.2.3.4,
  10.0.0.0/8, [::1], each with an optional :PORT; the profiles' rules name port 443.  A
  name rule carries TLS for that name only (a tunnel must open with a ClientHello naming
  it); host:PORT/raw carries any protocol to that port.  Names pass only by name rules, IP
  addresses only by IP rules, and no name may lead to a non-public address unless an
  IP rule covers it; --allow-private (dangerous: your LAN) opens only the private-use
  networks (10/8, 172.16/12, 192.168/16, fc00::/7), never loopback, link-local or
  CGNAT.  Cloud platform endpoints (the metadata service, Azure's 168.63.129.16...)
  need a rule for exactly that address.  Presets (PRESETS, a
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

Options
  Options this wrapper does not know, and everything after the first --, go to the CLI;
  but an unknown option close to one of ours (--filter-netwrok, a prefix such as
  --filter) is refused before anything starts, with "did you mean", unless the profile
  lists it as the CLI's (cli_options).  A CLI option that looks like ours goes after --.

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
  with --version, bounded), whether the node on PATH sends fetch() through the proxy,
  and every allow rule from the files and options; notes
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
  so Ctrl-C never cuts the network.  The terminal's modes are saved at start and restored
  on every way out (a CLI killed with the wrapper leaves it raw).  SIGTERM and SIGHUP
  (and SIGQUIT before the CLI starts) end the session with full clean-up, which also
  empties what the sandbox made unwritable.  The CLI's exit status is the wrapper's.

Exit status: the CLI's; 2 for bad options (or a bad defaults file, or an allow rule
or allow file that does not parse: checked before anything starts); 127 when bwrap,
socat or the CLI is missing; 1 for other errors (HOME not an absolute directory, a
protection that cannot be set up...).  Errors are one line on stderr, whatever
happens.  A relative XDG_CONFIG_HOME is ignored.
"""

__all__ = ["Wrapper", "plan_session", "SessionDirs", "FilterProxy", "run_sandbox", "Plan",
           "make_plan", "Profile", "PROFILES", "Failure", "Finished", "doctor"]

import time
STARTED = time.perf_counter()   # the start-up timings (StartupClock) count the imports from here
import errno
import fcntl
import marshal
import os
import select
import stat
import struct
import sys
import termios
try:                # signal's own C module: signal.py only wraps it in enums (enum: ~2.5 ms)
    import _signal as signal
except ImportError:
    import signal


class Lazy:
    """A standard module imported at its first use (an attribute read), so that a start
    that never needs it does not pay for it: importing these costs ~20 ms, twice what a
    session's whole planning takes."""

    def __init__(self, name):
        self._name, self._module = name, None

    def __getattr__(self, attr):
        if self._module is None:
            self._module = __import__(self._name)
        return getattr(self._module, attr)


fnmatch, glob, json, shlex, subprocess, tempfile = map(
    Lazy, ["fnmatch", "glob", "json", "shlex", "subprocess", "tempfile"])


# ---------------------------------------------------------------------------------------------
# Constants, errors, and how the wrapper speaks
# ---------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.realpath(__file__))
FILTER_SCRIPT = os.path.join(HERE, "socks_filter.py")
BRIDGE_SCRIPT = os.path.join(HERE, "socat_bridge.sh")

# What a session's directory (SessionDirs) holds; the proxy's socket is in a directory of
# its own under the runtime base (see SessionDirs).
SESSION_HOME = "home"           # the session's home
SESSION_CACHE = "cache"         # package caches, at SANDBOX_CACHE inside
PROXY_SOCKET = "proxy.sock"
PROXY_LOG = "proxy.log"         # the proxy's decisions, unless --proxy-log names a file
PROXY_ERRORS = "proxy.err"      # what the proxy wrote on stderr
GIT_SNAPSHOT = "git-snapshot"       # the git guard's snapshot of the session's start (marshal)
GIT_SNAPSHOT_JSON = "git-snapshot.json"     # the same, left by a version before marshal

# Where the proxy socket and the bridge script appear inside the sandbox.
SANDBOX_RUN = "/run/bw"
SANDBOX_SOCKET = SANDBOX_RUN + "/" + PROXY_SOCKET
SANDBOX_BRIDGE = SANDBOX_RUN + "/" + os.path.basename(BRIDGE_SCRIPT)

PROXY_READY_SECONDS = 10
STOP_SECONDS = 5
STATE_FILE_LIMIT = 64 << 20


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


def printable(text):
    """Text from the proxy log, safe to print on a terminal."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


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


class suppress:
    """contextlib.suppress without importing contextlib (collections and functools: ~2 ms
    of every start): the block's exceptions of these kinds end it quietly."""

    def __init__(self, *kinds):
        self.kinds = kinds

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        return kind is not None and issubclass(kind, self.kinds)


def say(text):
    """A line on stderr, which may be a terminal that is gone (SIGHUP)."""
    with suppress(OSError, ValueError, AttributeError):
        write_out(text, sys.stderr)


class Finished(BaseException):
    """--list-presets, --dry-run or --doctor did their work: no session runs."""

    def __init__(self, code=0):
        super().__init__(code)
        self.code = code


# ---------------------------------------------------------------------------------------------
# Records: the little of dataclasses this module uses.  Importing dataclasses imports
# inspect, ast and dis, and making each class compiles code: ~8 ms of every start.
# ---------------------------------------------------------------------------------------------

class Factory:
    """A field's default made anew for each record (a list must not be shared)."""

    def __init__(self, make):
        self.make = make


def field(default_factory):
    return Factory(default_factory)


def dataclass(cls=None, frozen=False):
    """@dataclass or @dataclass(frozen=True) over a class of annotated fields: an __init__
    taking them in order (by position or name, defaults after), __repr__ and __eq__; a
    frozen record refuses changes and is hashable, others are not hashable."""
    if cls is None:
        return lambda cls: dataclass(cls, frozen)
    names = tuple(cls.__dict__.get("__annotations__") or getattr(cls, "__annotations__", {}))
    defaults = {name: cls.__dict__[name] for name in names if name in cls.__dict__}
    for name, default in defaults.items():
        if isinstance(default, Factory):
            delattr(cls, name)

    def __init__(self, *args, **kwargs):
        if len(args) > len(names) or not set(kwargs) <= set(names[len(args):]):
            raise TypeError(f"{cls.__name__}(): bad arguments {args!r} {kwargs!r}")
        values = {**dict(zip(names, args)), **kwargs}
        for name in names:
            if name not in values:
                if name not in defaults:
                    raise TypeError(f"{cls.__name__}(): missing {name!r}")
                default = defaults[name]
                values[name] = default.make() if isinstance(default, Factory) else default
            object.__setattr__(self, name, values[name])

    def fields(self):
        return tuple(getattr(self, name) for name in names)

    def __eq__(self, other):
        return fields(self) == fields(other) if other.__class__ is self.__class__ \
            else NotImplemented

    def __repr__(self):
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{cls.__qualname__}({shown})"

    def refuse(self, name, *value):
        raise AttributeError(f"cannot assign to field {name!r}: {cls.__name__} is frozen")

    cls.__init__, cls.__eq__, cls.__repr__ = __init__, __eq__, __repr__
    if frozen:
        cls.__setattr__ = cls.__delattr__ = refuse
        cls.__hash__ = lambda self: hash(fields(self))
    else:
        cls.__hash__ = None
    return cls


# ---------------------------------------------------------------------------------------------
# CLI profiles: everything that differs between the CLIs, as data
# ---------------------------------------------------------------------------------------------

PROJECT_KEY = "{project}"   # in a guarded key: the session's project directory, one segment
SLUG = "{slug}"             # in a State path: this project's directory name in Claude's state
PROJECT_ID = "{id}"         # in a State path: the CLI's short id for this project, the
                            # directory in Profile.project_ids whose PROJECT_ROOT names it
PROJECT_ROOT = ".project_root"
LOWER_DIGITS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
LETTERS_DIGITS = LOWER_DIGITS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")   # ASCII only


def is_project_id(name):
    """Whether `name` can be a CLI's short project id: 1-100 of [a-z0-9-]."""
    return 0 < len(name) <= 100 and set(name) <= LOWER_DIGITS | {"-"}
GEMINI_IDS = ".gemini/tmp"

# What of ~/.claude.json goes back: the state Claude keeps across runs (counters, onboarding
# and tips, the changelog it shows, this project's history and statistics), by exact name or a
# narrow pattern, never what names a command, grants something or decides what Claude does
# before its own checks: mcpServers, env, apiKeyHelper, primaryApiKey, customApiKeyResponses
# (approved API keys), allowedTools, enabled*McpjsonServers, enableAllProjectMcpServers, the
# feature-gate and access caches (cachedGrowthBookFeatures, cachedStatsigGates,
# cachedDynamicConfigs, s1mAccessCache), and anything of another project (PROJECT_KEY: this
# project only).  The session's own project may record the trust dialog its user answered.
CLAUDE_JSON_KEYS = (
    "numStartups", "firstStartTime", "userID", "anonymousId", "hasCompletedOnboarding",
    "lastOnboardingVersion", "lastReleaseNotesSeen", "changelogLastFetched", "cachedChangelog",
    "tipsHistory", "*Count", "*UseCount", "has*Seen*", "has*Shown*", "hasUsed*",
    "hasSeenTasksHint", "hasAvailableSubscription", "recommendedSubscription",
    "fallbackAvailableWarningThreshold", "feedbackSurveyState", "isQualifiedForDataSharing",
    "claudeCodeFirstTokenDate", "oauthAccount",
    "bypassPermissionsModeAccepted", "theme", "lastPlanModeUse",
    *(f"projects.{PROJECT_KEY}.{key}" for key in (
        "history", "last*", "projectOnboardingSeenCount", "hasCompletedProjectOnboarding",
        "exampleFiles", "exampleFilesGeneratedAt", "hasClaudeMdExternalIncludesWarningShown",
        "reactVulnerabilityCache")),
    (f"projects.{PROJECT_KEY}.hasTrustDialogAccepted", (True, False)))

# What of ~/.claude/.credentials.json goes back: the OAuth tokens a login or a refresh inside
# wrote (plain values only, see the "secret" check).
CLAUDE_CREDENTIAL_KEYS = tuple(f"claudeAiOauth.{key}" for key in (
    "accessToken", "refreshToken", "expiresAt", "scopes", "subscriptionType", "rateLimitTier"))


@dataclass(frozen=True)
class State:
    """One home-relative path of a CLI's state: how the session gets the host's (seed) and
    what of the session's goes back at exit (back, checked by the FLOWS_BACK function of
    that name).  In the path, "{slug}" (SLUG) is this project's directory name in
    Claude's state, "{id}" (PROJECT_ID) its directory in Gemini's."""
    path: str
    seed: str = "copy"      # "copy": a writable copy; "ro": a read-only copy; "mine":
                            # the lines of this project (a shared JSONL file); "": none
    back: str = ""          # "": nothing; "keys": changes to `keys` (as guarded_changes);
                            # "secret": the same, plain values only; "lines": new or
                            # appended JSON lines of *.jsonl files (transcripts); "id":
                            # one line of letters, digits and "-" (an installation id);
                            # "mine": appended JSON lines of this project
    keys: tuple = ()


# The CLIs' long options (`claude --help` of 2.1.197, `gemini --help` of 0.61.0), as data: an
# unknown option close to one of the wrapper's is refused as a typo unless the CLI has it.
CLAUDE_OPTIONS = (
    "--add-dir", "--agent", "--agents", "--allow-dangerously-skip-permissions", "--allowedTools",
    "--append-system-prompt", "--ax-screen-reader", "--bare", "--betas", "--bg", "--brief",
    "--chrome", "--continue", "--dangerously-skip-permissions", "--debug", "--debug-file",
    "--disable-slash-commands", "--disallowedTools", "--effort",
    "--exclude-dynamic-system-prompt-sections", "--fallback-model", "--file", "--fork-session",
    "--from-pr", "--ide", "--include-hook-events", "--include-partial-messages",
    "--input-format", "--json-schema", "--max-budget-usd", "--mcp-config", "--model", "--name",
    "--no-chrome", "--no-session-persistence", "--output-format", "--permission-mode",
    "--plugin-dir", "--plugin-url", "--print", "--prompt-suggestions", "--remote-control",
    "--remote-control-session-name-prefix", "--replay-user-messages", "--resume", "--safe-mode",
    "--session-id", "--setting-sources", "--settings", "--strict-mcp-config", "--system-prompt",
    "--tmux", "--tools", "--version", "--worktree")

GEMINI_OPTIONS = (
    "--accept-raw-output-risk", "--acp", "--admin-policy", "--allowed-mcp-server-names",
    "--allowed-tools", "--approval-mode", "--debug", "--delete-session", "--experimental-acp",
    "--extensions", "--include-directories", "--list-extensions", "--list-sessions", "--model",
    "--output-format", "--policy", "--prompt", "--prompt-interactive", "--raw-output", "--resume",
    "--sandbox", "--screen-reader", "--session-file", "--session-id", "--skip-trust",
    "--version", "--worktree", "--yolo")


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the CLIs, as data."""
    name: str               # the command, looked up on PATH
    tool: str               # the wrapper's name, used in messages and config paths
    lookup: tuple           # home-relative places tried after PATH
    install_hint: str
    state_dirs: tuple       # home-relative: the CLI's state, private to each session
    allow: tuple            # default allow list for --filter-network
    env_names: tuple        # host variables passed through: names, or prefixes ending in "*"
    env: tuple = ()         # (name, value) set inside
    cli_args: tuple = ()    # put before the user's arguments
    helpers: tuple = ()     # other programs the CLI needs visible (found on PATH)
    state: tuple = ()       # State items: what of the host's state the session gets, and
                            # what of its own goes back (the "CLI state" section)
    cli_options: tuple = ()  # the CLI's own long options, passed through even when one looks
                             # like a misspelt option of the wrapper's (see misspelt_option)
    expected_blocked: tuple = ()  # host:port every session contacts and the default allow list
                                  # blocks by design: summed up on one quiet line at exit
    project_config: tuple = ()  # project-relative files and directories ("/" at the end) the
                                # CLI reads its settings, hooks and commands from: protected
                                # (PROTECTED_PROJECT) in every tool's sessions
    project_config_globs: tuple = ()    # the same, as glob patterns of existing files
    project_ids: str = ""   # home-relative: a directory of one directory per project, named
                            # by the CLI's id for it (PROJECT_ID) and holding PROJECT_ROOT
    project_registry: str = ""  # home-relative JSON file: {"projects": {path: id}}


PROFILES = {
    "claude": Profile(
        name="claude",
        tool="bw-claude",
        lookup=(".claude/local/claude", ".local/bin/claude"),
        install_hint="npm install -g @anthropic-ai/claude-code",
        state_dirs=(".claude",),
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
        state=(State(".claude.json", back="keys", keys=CLAUDE_JSON_KEYS),
               State(".claude/.credentials.json", back="secret", keys=CLAUDE_CREDENTIAL_KEYS),
               State(".claude/settings.json", back="keys",
                     keys=("skipDangerousModePermissionPrompt", "model", "outputStyle",
                           "alwaysThinkingEnabled", "spinnerTipsEnabled",
                           "feedbackSurveyState")),
               State(".claude/CLAUDE.md", seed="ro"),
               State(".claude/commands", seed="ro"),
               State(".claude/agents", seed="ro"),
               State(".claude/projects/{slug}", back="lines"),
               # The prompt history (arrow up): this project's lines only, both ways.
               State(".claude/history.jsonl", seed="mine", back="mine")),
        cli_options=CLAUDE_OPTIONS,
        project_config=(".claude/settings.json", ".claude/settings.local.json",
                        ".claude/commands/", ".claude/agents/", ".claude/hooks/",
                        ".claude/skills/", ".mcp.json"),
        project_config_globs=(".claude/settings*.json",),
    ),
    "gemini": Profile(
        name="gemini",
        tool="bw-gemini",
        lookup=(),
        install_hint="npm install -g @google/gemini-cli",
        state_dirs=(".gemini",),
        allow=("generativelanguage.googleapis.com:443", "cloudcode-pa.googleapis.com:443",
               "oauth2.googleapis.com:443", "www.googleapis.com:443", "accounts.google.com:443"),
        env_names=("GEMINI_*", "GOOGLE_GEMINI_BASE_URL", "GOOGLE_API_KEY", "GOOGLE_CLOUD_PROJECT",
                   "GOOGLE_CLOUD_LOCATION",
                   "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_GCA"),
        helpers=("node",),
        # Measured (0.61.0, interactive start): usage statistics and the update check.
        expected_blocked=("play.googleapis.com:443", "registry.npmjs.org:443"),
        state=(State(".gemini/oauth_creds.json", back="secret",
                     keys=("access_token", "refresh_token", "scope", "token_type", "id_token",
                           "expiry_date")),
               State(".gemini/google_accounts.json", back="secret", keys=("active", "old")),
               State(".gemini/installation_id", back="id"),
               State(".gemini/settings.json", back="keys",
                     keys=("security.auth.selectedType", "ui.theme", "model.name",
                           "general.vimMode")),
               # Trust given inside: for this project only, never for its parent.
               State(".gemini/trustedFolders.json", back="keys",
                     keys=((PROJECT_KEY, ("TRUST_FOLDER", "DO_NOT_TRUST")),)),
               # This project's chats, for --resume: the directory is seeded, and its
               # chats/*.jsonl go back (after the project_id checks).
               State(f"{GEMINI_IDS}/{PROJECT_ID}"),
               State(f"{GEMINI_IDS}/{PROJECT_ID}/chats", seed="", back="lines"),
               State(".gemini/.env", seed="ro"),
               State(".gemini/GEMINI.md", seed="ro"),
               State(".gemini/commands", seed="ro")),
        cli_options=GEMINI_OPTIONS,
        project_config=(".gemini/settings.json", ".gemini/.env", ".gemini/commands/",
                        ".gemini/extensions/"),
        project_ids=GEMINI_IDS,
        project_registry=".gemini/projects.json",
    ),
}


def hidden_paths(profile):
    """Home-relative paths this profile's sandbox never shows: SECRETS, and the other
    CLIs' state (their credentials: ~/.gemini/oauth_creds.json from bw-claude,
    ~/.claude/.credentials.json and ~/.claude.json from bw-gemini)."""
    others = [p for p in PROFILES.values() if p.name != profile.name]
    return tuple(dict.fromkeys([*SECRETS, *(d for p in others for d in p.state_dirs),
                                *(f for p in others for f in top_state_files(p))]))


def host_config():
    """Home-relative paths of every CLI's settings and state on the host: its state
    directories and files, what its State items name there, and the places it reads
    settings, hooks and commands from (its project_config, read in the home too)."""
    paths = []
    for p in PROFILES.values():
        paths += [*p.state_dirs, *top_state_files(p), *(i.path for i in p.state),
                  *(c.rstrip("/") for c in p.project_config)]
    return [path for path in dict.fromkeys(paths) if "{" not in path]


def top_state_files(profile):
    """The profile's State paths that are not inside one of its state directories
    (~/.claude.json)."""
    return [i.path for i in profile.state
            if not any(i.path.startswith(d + "/") for d in profile.state_dirs)]


# ---------------------------------------------------------------------------------------------
# The sandbox's layout: what it shows of the system and the home, secrets, protected
# paths, caches, presets and the seccomp tables
# ---------------------------------------------------------------------------------------------

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
# Caches (~/.npm...) are not tools: each session has its own (CACHE_ENV).
HOME_TOOLS = (".cargo", ".rustup", ".nvm", ".pyenv", ".rbenv", ".volta", ".bun",
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

# Paths an agent could write to get code run later, outside the sandbox:
# read-only even though their parent is writable, and held by an empty placeholder for the
# session when they do not exist yet, so they cannot be created.  A trailing "/" marks a
# directory.  Paths under .git count only when .git is a directory; a .git that is a file
# (a linked worktree, a submodule) is itself read-only.  They apply to the project and to
# every --allow-rw directory.  .git/info/ stays writable: its attributes can only name
# drivers whose commands come from .git/config, as .gitattributes in the tree can.
PROTECTED_PROJECT = (".git/hooks/", ".git/config", ".git/commondir", ".git/config.worktree",
                     ".git/modules/", ".git/worktrees/",
                     *(path for p in PROFILES.values() for path in p.project_config),
                     ".vscode/", ".idea/")
PROTECTED_GLOBS = tuple(pattern for p in PROFILES.values() for pattern in p.project_config_globs)

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

# The session's cache directory inside: on disk, the session's own, removed at exit.
SANDBOX_CACHE = "/var/cache/bw"

# Package managers write their caches there, never into the host's: a cache the sandbox wrote
# and a later install outside read would carry a poisoned package out.  The tools themselves
# (~/.cargo/bin, ~/.nvm, ~/go/bin...) stay visible read-only.  (variable, subdirectory)
CACHE_ENV = (("XDG_CACHE_HOME", ""),            # pip, go-build, deno, yarn 1, pnpm's cache...
             ("npm_config_cache", "npm"), ("PIP_CACHE_DIR", "pip"),
             ("YARN_CACHE_FOLDER", "yarn"), ("npm_config_store_dir", "pnpm-store"),
             ("BUN_INSTALL_CACHE_DIR", "bun"), ("GOMODCACHE", "go-mod"),
             ("GOCACHE", "go-build"),
             # Cargo keeps its registry and git checkouts in CARGO_HOME, whose bin/ stays on
             # PATH read-only; ~/.cargo/config.toml is then not read inside.
             ("CARGO_HOME", "cargo"))

# Node's fetch() honours HTTP(S)_PROXY only with NODE_USE_ENV_PROXY=1, from Node 24.0 and
# 22.21; http/https.request from 24.5 and 22.21 (Node's changelogs).  Earlier versions ignore
# the variable, so it is set for every session with the filter; nothing is put in NODE_OPTIONS,
# which an older node would refuse to start with.
NODE_FETCH_PROXY = ((22, 21), (24, 0))

NODE_HTTP_PROXY = ((22, 21), (24, 5))


# ---------------------------------------------------------------------------------------------
# Options: the command line and the defaults file
# ---------------------------------------------------------------------------------------------
# The options are data (option_table, an Option each).  fast_parse reads the common tokens
# from that table; the tokens it declines (--help, whatever argparse would refuse, a few rare
# spellings) go to argparse, whose parser is built from the same table (build_parser), so the
# two cannot disagree about what options exist.  argparse (with re, enum and gettext: ~10 ms
# of every start) is imported only then.

@dataclass(frozen=True)
class Option:
    """One option of the wrapper's: its flags and what it does (`kind`):
         store        takes a value: --dir PATH or --dir=PATH
         append       takes a value, repeatable: the values accumulate
         store_true   True once given, else False
         switch       True, or False by its `off` flag: the last one given wins, so a
                      command-line option can undo one from the defaults file; else None
         set_all      sets each (destination, value) of `sets` (--no-network)
         help         prints --help and exits (argparse does)
    Its destination is its first long flag's name (--allow-ro: opts.allow_ro)."""
    flags: tuple
    kind: str
    metavar: str = None
    off: str = None
    sets: tuple = ()
    help: str = ""


@dataclass(frozen=True)
class OptionGroup:
    """A heading of --help, with its options in order; no title: argparse's own "options:"."""
    title: str
    description: str
    options: tuple


def option_table(profile):
    """Every option of the wrapper's, in --help's order; their help names the profile's CLI."""
    return (OptionGroup(None, None, (
                Option(("-h", "--help"), "help", help="show this help message and exit"),)),
            sandbox_options(profile), network_options(profile), diagnostic_options(profile))


def sandbox_options(profile):
    tool, cli = profile.tool, profile.name
    skip = (Option(("--no-skip-permissions",), "switch", off="--skip-permissions",
                   help=f"do not pass {' '.join(profile.cli_args)} to {cli}"),)
    return OptionGroup("sandbox", f"what {cli} sees; e.g. {tool} --dir ~/src/app --allow-ro "
                                  "~/src/shared-lib", (
        Option(("--dir",), "store", metavar="PATH",
               help="project directory, writable inside (default: the current directory)"),
        Option(("--allow-ro",), "append", metavar="PATH",
               help="also show PATH read-only (repeatable; must exist)"),
        Option(("--allow-rw",), "append", metavar="PATH",
               help="also show PATH read-write (repeatable; must exist)"),
        Option(("--full-home-access",), "switch", off="--no-full-home-access",
               help="show the whole home read-only (secrets stay hidden)"),
        Option(("--pass-env",), "append", metavar="VAR",
               help="pass this host variable in (repeatable)"),
        Option(("--env",), "append", metavar="VAR=VALUE",
               help="set a variable inside, over any other (repeatable)"),
        Option(("--shell",), "store_true",
               help=f"run a shell instead of {cli}; arguments after -- go to it, "
                    "e.g. --shell -- -c 'cmd'"),
        Option(("--allow-config-writes",), "switch", off="--no-allow-config-writes",
               help="let the sandbox change .git/hooks, .git/config, .claude/settings*.json, "
                    ".mcp.json and the like, and the CLI's own state (~/.claude) directly, and "
                    "keep the repositories it makes (risk: code the agent writes there runs "
                    "later, outside the sandbox)"),
        *(skip if profile.cli_args else ())))


def network_options(profile):
    tool, cli = profile.tool, profile.name
    return OptionGroup("network", f"e.g. {tool} --filter-network --allow-preset github "
                                  "--allow-preset npm", (
        Option(("--no-network",), "set_all",
               sets=(("unshare_net", True), ("filter_network", False)),
               help="no network at all (an empty network namespace); "
                    "--unshare-net --no-filter-network"),
        Option(("--unshare-net",), "switch", off="--share-net",
               help="an empty network namespace (the default with --filter-network); "
                    "--filter-network --share-net is advisory: programs that ignore the proxy "
                    "variables reach the network directly, and the proxy asks every client for "
                    "a per-session credential, so other local users cannot use it"),
        Option(("--filter-network",), "switch", off="--no-filter-network",
               help=f"network only through a filtering proxy that allows the {cli} API and your "
                    "allow list; implies --unshare-net, so nothing else gets out"),
        Option(("--allow-domain",), "append", metavar="RULE",
               help="allow a destination: example.com, *.example.com, 1.2.3.4, 10.0.0.0/8, "
                    "[::1], each with optional :PORT; a name carries only TLS for that name "
                    "unless the rule ends in :PORT/raw (ssh, plain HTTP, a database: "
                    "github.com:22/raw) (repeatable)"),
        Option(("--host-port",), "append", metavar="PORT[:HOSTPORT]",
               help="make the host's 127.0.0.1:HOSTPORT (default PORT) appear at 127.0.0.1:PORT "
                    "inside, through the proxy, which logs it (repeatable; needs --unshare-net)"),
        Option(("--allow-file",), "append", metavar="FILE",
               help="read allow rules from FILE, one a line (repeatable)"),
        Option(("--allow-preset",), "append", metavar="NAME",
               help="allow a ready-made list: " + ", ".join(PRESETS) +
                    " (repeatable; see --list-presets)"),
        Option(("--learn",), "store", metavar="FILE",
               help="open network (private addresses excepted) through the proxy, and at exit "
                    "write the destinations used to FILE, ready for --allow-file; implies "
                    "--filter-network --unshare-net"),
        Option(("--allow-private",), "switch", off="--no-allow-private",
               help="DANGEROUS: let allowed names reach private-use addresses (10/8, 172.16/12, "
                    "192.168/16, fc00::/7: your LAN); with --learn, learn them too.  Loopback, "
                    "link-local and CGNAT still need an IP rule (--allow-domain 10.0.0.5:8080 is "
                    "the narrow way), cloud metadata endpoints a rule for exactly their address"),
        Option(("--proxy-log",), "store", metavar="FILE",
               help="keep the proxy's JSON log (one object per decision and close) in FILE")))


def diagnostic_options(profile):
    tool = profile.tool
    return OptionGroup("diagnostics", f"e.g. {tool} --doctor", (
        Option(("--doctor",), "store_true",
               help="check bwrap, user namespaces, socat, the CLI, the seccomp filter and the "
                    "allow lists, saying how to fix what fails"),
        Option(("--list-presets",), "store_true",
               help="print the --allow-preset lists, in allow-file format"),
        Option(("--no-defaults",), "store_true", help=f"ignore ~/.config/{tool}/options"),
        Option(("-v", "--verbose"), "switch", off="--no-verbose",
               help="print the configuration, the full commands and where the time went before "
                    "and after the session (per phase) to stderr"),
        Option(("--dry-run",), "store_true",
               help="print the commands that would run, shell-quoted, and exit")))


def destination(option):
    """Where an option's value goes: its first long flag's name (--allow-ro: allow_ro)."""
    return next(flag for flag in option.flags if flag.startswith("--"))[2:].replace("-", "_")


OPTION_FLAGS = {}   # option_flags' answer, by profile


def option_flags(profile):
    """Every flag of the profile's options, a switch's `off` too, in the table's order: (its
    Option, its destination, the value it sets when it takes none).  Made once a profile
    (~0.2 ms), as every start reads it two or three times."""
    flags = OPTION_FLAGS.get(profile)
    if flags is None:
        flags = OPTION_FLAGS[profile] = {}
        for group in option_table(profile):
            for option in group.options:
                dest = destination(option)
                flags.update({flag: (option, dest, True) for flag in option.flags})
                if option.off:
                    flags[option.off] = (option, dest, False)
    return flags


class Options:
    """The parsed options, one attribute a destination (opts.allow_ro...), and opts.args, the
    CLI's: what argparse.Namespace would be, without argparse (which fills one too)."""

    def __eq__(self, other):
        return vars(self) == vars(other) if isinstance(other, Options) else NotImplemented

    def __repr__(self):
        return "Options(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items()) + ")"


def option_defaults(flags):
    """What argparse sets before parsing: each destination's default, in the table's order."""
    opts = Options()
    for option, dest, _ in flags.values():
        if hasattr(opts, dest):
            continue
        if option.kind in ("store", "switch"):
            setattr(opts, dest, None)
        elif option.kind == "append":
            setattr(opts, dest, [])
        elif option.kind == "store_true":
            setattr(opts, dest, False)
    return opts


def fast_parse(flags, tokens):
    """argparse's parse_known_args (allow_abbrev=False) over `flags` (option_flags), for the
    tokens whose reading it is sure of: (Options, the tokens that are not ours, in order), or
    None to hand the whole job to argparse.  It declines -h and --help; "--"; a single-dash
    token that starts with a short flag of ours without being one (-vv, -vh, -v=x: argparse
    reads combined flags); a value given to an option that takes none (--shell=x); a missing,
    empty or dash-led value (--dir -x: whether that is an option is argparse's call).  Any
    other token not ours goes to the CLI, as argparse leaves it: words, -p, -1, --unknown."""
    shorts = tuple(flag for flag in flags if not flag.startswith("--"))
    opts, unknown, at = option_defaults(flags), [], 0
    while at < len(tokens):
        token, at = tokens[at], at + 1
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if name not in flags:
            if token == "--" or token.startswith(shorts):
                return None
            unknown.append(token)
            continue
        option, dest, on = flags[name]
        if option.kind in ("store", "append"):
            if not eq:
                if at == len(tokens):
                    return None
                value, at = tokens[at], at + 1
            if not value or value.startswith("-"):
                return None
            if option.kind == "append":
                getattr(opts, dest).append(value)
            else:
                setattr(opts, dest, value)
        elif eq or option.kind == "help":
            return None
        else:
            for dest, value in option.sets or ((dest, on),):
                setattr(opts, dest, value)
    return opts, unknown


def parse_known(profile, tokens):
    """(Options, the tokens that are not ours, in order), exactly as argparse's
    parse_known_args gives them (its errors and --help included): fast_parse's reading, or
    argparse's when fast_parse declines."""
    return fast_parse(option_flags(profile), tokens) or \
        build_parser(profile).parse_known_args(tokens, Options())


def build_parser(profile):
    """argparse's parser, built from option_table: it prints --help and reads what fast_parse
    declines."""
    argparse, Parser, HelpFormatter, SetAll = argparse_classes()
    parser = Parser(prog=profile.tool, allow_abbrev=False, add_help=False,
                    formatter_class=HelpFormatter, **help_texts(profile))
    for group in option_table(profile):
        adding = parser.add_argument_group(group.title, group.description) if group.title \
            else parser
        for option in group.options:
            for flags, settings in argparse_calls(option, argparse.SUPPRESS, SetAll):
                adding.add_argument(*flags, **settings)
    return parser


def argparse_calls(option, hidden, set_all):
    """An Option as argparse's add_argument calls: [(flags, keyword arguments)]; a switch is
    two, its `off` flag hidden from --help, which says "(undo: OFF)" instead."""
    kind, name = option.kind, destination(option)
    if kind == "help":
        return [(option.flags, dict(action="help", default=hidden, help=option.help))]
    if kind == "set_all":
        return [(option.flags, dict(action=set_all, dest=hidden, values=dict(option.sets),
                                    help=option.help))]
    if kind == "switch":
        return [(option.flags, dict(dest=name, action="store_const", const=True, default=None,
                                    help=f"{option.help} (undo: {option.off})")),
                ((option.off,), dict(dest=name, action="store_const", const=False, help=hidden))]
    if kind == "store_true":
        return [(option.flags, dict(dest=name, action=kind, help=option.help))]
    return [(option.flags, dict(dest=name, action=kind, metavar=option.metavar, help=option.help,
                                **({"default": []} if kind == "append" else {})))]


def argparse_classes():
    """argparse, and this wrapper's Parser, HelpFormatter and SetAll action over it: made when
    build_parser first needs them, never at start."""
    import argparse     # here: only --help and what fast_parse declines pay for it

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise Failure(f"{message} (see --help)", 2)

    class HelpFormatter(argparse.RawDescriptionHelpFormatter):
        """Keeps option names whole when wrapping help (--no-filter-network, not --no-filter-)."""

        def _split_lines(self, text, width):
            import textwrap     # only --help needs it: not imported at every start
            return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    class SetAll(argparse.Action):
        """An option that sets several destinations at once (--no-network)."""

        def __init__(self, option_strings, dest, values, **kwargs):
            super().__init__(option_strings, dest, nargs=0, **kwargs)
            self.values = values

        def __call__(self, parser, namespace, values, option_string=None):
            for name, value in self.values.items():
                setattr(namespace, name, value)

    return argparse, Parser, HelpFormatter, SetAll


def help_texts(profile):
    """--help's usage line, its text before the options and its examples after."""
    tool, cli = profile.tool, profile.name
    return dict(
        usage=f"{tool} [options] [--] [{cli} arguments]",
        description=f"Run {cli} in a bubblewrap sandbox: read-only system, an empty home with only "
                    f"{cli}'s state,\nthe project directory writable, secrets (~/.ssh, ~/.aws, ...) "
                    "never visible.\nOptions this wrapper does not know, and everything after --, "
                    f"go to {cli};\none that looks like a typo of ours is refused.\n"
                    "Of two options that contradict each other, the last wins.",
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


@dataclass(frozen=True)
class EarlyFlags:
    """The options read before the full parse, which needs the defaults file (and so a
    checked home): they decide whether those are read at all, and whether the proxy's
    interpreter starts before the plan."""
    help: bool              # --help, -h: no home needed, no defaults file read
    list_presets: bool      # no home needed
    doctor: bool            # --doctor runs instead of a session
    no_defaults: bool       # the defaults file is not read
    filter_network: bool    # on the command line (the defaults file may add it later)


def early_flags(argv):
    ours = set(split_argv(argv)[0])
    return EarlyFlags(help=bool(ours & {"--help", "-h"}), list_presets="--list-presets" in ours,
                      doctor="--doctor" in ours, no_defaults="--no-defaults" in ours,
                      filter_network="--filter-network" in ours)


def parse_args(profile, argv, defaults=()):
    """Our options before the first "--"; everything we do not know goes to the CLI.
    `defaults` (from the defaults file) are read first, so the command line wins."""
    ours, after = split_argv(argv)
    given, unknown = parse_known(profile, ours)
    refuse_misspelt(profile, unknown)
    opts = parse_known(profile, [*defaults, *ours])[0] if defaults else given
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


def config_dir(environ, tool):
    """~/.config/TOOL, honouring XDG_CONFIG_HOME."""
    base = environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):         # relative: ignored, as the XDG spec says
        base = os.path.join(environ.get("HOME", ""), ".config")
    return os.path.join(base, tool)


def config_path(environ, tool, name):
    return os.path.join(config_dir(environ, tool), name)


def expand_home(token, home):
    """~/x, and --opt=~/x, as paths in the home: shlex does not expand them."""
    option, eq, value = token.partition("=") if token.startswith("--") else ("", "", token)
    if value == "~" or value.startswith("~/"):
        value = home + value[1:]
    return option + eq + value


def parse_defaults(profile, text, path, home):
    """The defaults file's options: each line shlex-split, '#' comments.  Every line must be
    complete options of ours, so a typo is an error here rather than an argument to the CLI."""
    tokens = []
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
            unknown = parse_known(profile, words)[1]
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


def format_presets():
    """--list-presets: every preset as a commented block of an allow file."""
    blocks = [f"# {name}: {description} (--allow-preset {name})\n" + "\n".join(rules)
              for name, (description, rules) in PRESETS.items()]
    return "\n\n".join(blocks) + "\n"


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


def advisory_token(opts):
    """A fresh random password for the proxy when its bridge listens on the host's loopback
    (--filter-network --share-net), where every local user could use it; else None."""
    if opts.filter_network and not opts.unshare_net:
        import secrets      # only --share-net needs it: not imported at every start
        return secrets.token_urlsafe(24)
    return None


def misspelt_option(token, ours, cli_options=()):
    """The wrapper's options `token` (an option its parser did not know) may be a typo of: a
    prefix of them, or close to one (--filter-netwrok); [] when the CLI has it, or when
    nothing of ours looks like it.  A CLI option that looks like ours goes after --."""
    name = token.split("=", 1)[0]
    if not name.startswith("--") or len(name) < 3 or name in cli_options or \
            any(c.isspace() for c in name):
        return []
    prefixed = [o for o in ours if o.startswith(name)]
    if prefixed:
        return prefixed
    import difflib      # here: only an unknown option pays for it
    return difflib.get_close_matches(name, ours, n=1, cutoff=0.8)


def refuse_misspelt(profile, unknown):
    """Refuse, before anything starts, an unknown option that looks like one of ours."""
    ours = sorted(flag for flag in option_flags(profile) if flag.startswith("--"))
    for token in unknown:
        close = misspelt_option(token, ours, profile.cli_options)
        if close:
            name = token.split("=", 1)[0]
            raise Failure(f"{name}: not a {profile.tool} option; did you mean "
                          f"{' or '.join(close)}?  (an option for {profile.name} goes after "
                          f"--: {profile.tool} -- {name})", 2)


# ---------------------------------------------------------------------------------------------
# Host facts: programs, their install trees and what the host's tools can do
# ---------------------------------------------------------------------------------------------

# The host's programs the wrapper runs: the option that needs each (None: every session),
# and its package (Debian, Fedora).
TOOLS = {
    "bwrap": (None, "bubblewrap"),
    "socat": ("--filter-network", "socat"),
}
OWN_FILES = (FILTER_SCRIPT, BRIDGE_SCRIPT)  # the wrapper's files that must lie beside bw_lib.py


@dataclass
class Host:
    """This machine's programs, probed once (paths and binaries read, nothing run): the
    plan, the checks before a session starts and --doctor all read it."""
    search_path: str
    bwrap: str = None           # absolute paths, None when not found
    socat: str = None
    env_program: str = None     # env(1) when it can reset SIGINT (--default-signal)
    disable_userns: bool = False    # bwrap has --disable-userns
    missing_files: tuple = ()   # OWN_FILES that are not there
    system: list = field(default_factory=list)  # SYSTEM_DIRS present: (path, link target)
    etc: list = field(default_factory=list)     # ETC_ENTRIES present, as /etc paths
    etc_files: tuple = ()       # those of them that are regular files (through a link)


def probe_host(environ):
    """The Host facts, from the wrapper's environment's PATH."""
    search_path = environ.get("PATH", os.defpath)
    bwrap = find_program("bwrap", search_path)
    env_program = find_program("env", "/usr/bin:/bin")
    etc = {f"/etc/{e}": stat_or_none(f"/etc/{e}") for e in ETC_ENTRIES}
    return Host(search_path=search_path, bwrap=bwrap,
                socat=find_program("socat", search_path),
                env_program=env_program if env_program and env_resets_signals(env_program)
                else None,
                disable_userns=bool(bwrap) and bwrap_supports(bwrap, "--disable-userns"),
                missing_files=tuple(p for p in OWN_FILES if not os.path.isfile(p)),
                system=[(d, os.readlink(d) if os.path.islink(d) else None)
                        for d in SYSTEM_DIRS if os.path.lexists(d)],
                etc=[path for path, info in etc.items() if info],
                etc_files=tuple(path for path, info in etc.items()
                                if info and stat.S_ISREG(info.st_mode)))


def install_hint(tool):
    package = TOOLS[tool][1]
    return f"as root: apt-get install {package}  (Fedora: dnf install {package})"


def keep_beside(path):
    return f"keep {os.path.basename(path)} next to bw_lib.py"


def check_tools(plan, host):
    """Refuse, before anything starts, a session whose programs or files are missing."""
    for tool, (needed_by, _) in TOOLS.items():
        if getattr(host, tool) is None and (needed_by is None or plan.filter):
            needs = f" ({needed_by} needs it)" if needed_by else ""
            raise Failure(f"{tool} not found{needs}; install it, {install_hint(tool)}", 127)
    if plan.filter and host.missing_files:
        path = host.missing_files[0]
        raise Failure(f"{path} is missing; {keep_beside(path)}")


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


def env_resets_signals(path):
    """Whether this env(1) has --default-signal (coreutils >= 8.31), read without running it."""
    try:
        with open(path, "rb") as f:
            return b"default-signal" in f.read(1 << 20)
    except OSError:
        return False


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


def bwrap_supports(bwrap, option):
    """Whether this bwrap knows `option`, read from its binary rather than by running it."""
    try:
        with open(bwrap, "rb") as f:
            return option.encode() in f.read(4 << 20)
    except OSError:
        return False


def terminal_width(stream):
    """The terminal's width when `stream` is one, else None."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else None
    except (OSError, ValueError, AttributeError):
        return None


def node_version(text):
    """(major, minor) from `node --version` output such as "v20.20.2", or None."""
    parts = text.strip().lstrip("v").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return None


def node_honours(version, since):
    """Whether Node `version` has a feature added in the (major, minor) releases of `since`
    (each line from its release on, and every later major)."""
    lines = dict(since)
    if version[0] in lines:
        return version[1] >= lines[version[0]]
    return version[0] > max(lines)


# ---------------------------------------------------------------------------------------------
# Filesystem helpers and walks: bounded, and never following a link the sandbox planted
# ---------------------------------------------------------------------------------------------

# Python's own C modules for the hashes the wrapper checks (git indexes): hashlib loads
# OpenSSL first, ~5 ms.  Only the module this Python has is imported: a missing one would be
# looked for along all of sys.path, written to by the sandbox when not run isolated.
HASHES = {"sha1": "_sha1", "sha256": "_sha2" if sys.version_info >= (3, 12) else "_sha256"}


def hash_of(name, data):
    """The digest of `data` by the hash `name` (sha1, sha256)."""
    try:
        module = __import__(HASHES[name])
    except ImportError:         # a Python built without it
        import hashlib
        return hashlib.new(name, data).digest()
    return getattr(module, name)(data).digest()


def stat_or_none(path, follow=True):
    try:
        return os.stat(path, follow_symlinks=follow)
    except OSError:
        return None


def is_within(path, parent):
    return path == parent or path.startswith(parent.rstrip("/") + "/")


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


def host_file_problem(path, roots=()):
    """Why the wrapper must not write `path` on the host (None when it may): a link on the
    way to it below a writable root, or something there that is not a regular file of
    ours (a link to ~/.bashrc the sandbox left in place of a log)."""
    where = root_of(path, roots)
    link = planted_link(where[0], os.path.join(*where)) if where else None
    if link is not None and link != path:
        return f"{link} is a symbolic link (remove it: rm {shlex.quote(link)})"
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        return error.strerror
    if stat.S_ISLNK(info.st_mode):
        return f"it is a symbolic link (remove it: rm {shlex.quote(path)})"
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        return "it is not a regular file of yours"
    return None


def open_text(path):
    """A regular file for reading, never through a link at its name."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return open(fd, errors="replace")


def is_real_dir(path):
    """A directory itself, not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def planted_link(root, path, lstat=os.lstat):
    """The first component of `path` below `root` that is a symlink, or None (a missing
    component ends the search: nothing below it exists)."""
    current = root
    for part in os.path.relpath(path, root).split("/"):
        current = os.path.join(current, part)
        try:
            mode = lstat(current).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(mode):
            return current
    return None


def link_refusal(path, what="a protected path"):
    way_out = ", or run with --allow-config-writes" if what == "a protected path" else ""
    return Failure(f"{path} is a symbolic link where {what} is expected; it is never followed "
                   f"(it may have been planted by a sandboxed session): remove it "
                   f"(rm {shlex.quote(path)}){way_out}")


def root_of(path, roots):
    """(real root, path relative to it) for the writable root `path` lies strictly below,
    or None.  `roots` are (path as mounted, real path) pairs."""
    for mounted, real in roots:
        for base in (mounted, real):
            if path != base and is_within(path, base):
                return real, os.path.relpath(path, base)
    return None


def open_beneath(root, relative):
    """An O_PATH descriptor of root/relative, reached without following any link below
    root; None when a component is missing.  A link raises link_refusal."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    path = root
    try:
        for part in relative.split("/"):
            if part in ("", ".", ".."):
                raise Failure(f"{root}/{relative}: not a plain path below {root}")
            path = os.path.join(path, part)
            try:
                child = os.open(part, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                return None
            os.close(fd)
            fd = child
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise link_refusal(path)
        result, fd = fd, None
        return result
    finally:
        if fd is not None:
            os.close(fd)


def parent_beneath(root, relative):
    """(descriptor of relative's directory, its last name), checked as open_beneath."""
    head, name = os.path.split(relative)
    fd = open_beneath(root, head) if head else os.open(root, os.O_PATH | os.O_DIRECTORY)
    if fd is None:
        raise FileNotFoundError(2, "No such file or directory", os.path.join(root, head))
    return fd, name


def private_subdir(base, name):
    """base/name, a directory of this user only (made 0700 if missing); refused if it is a
    link, someone else's or open to others."""
    path = os.path.join(base, name)
    with suppress(FileExistsError):
        os.mkdir(path, 0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        os.close(fd)
        raise Failure(f"{path} is not a private directory of yours: remove it, or if someone "
                      "else made it, set XDG_RUNTIME_DIR to a private directory of yours")
    return fd


REMOVE_DEPTH = 64       # the descriptors remove_tree holds at most


def remove_tree(path):
    """Remove the directory `path` and everything in it, never following a link, also what
    the sandbox made unreadable or unwritable (a directory is made 0700 before it is
    emptied); what cannot be removed stays.  Depth first, with a descriptor for each level
    as shutil.rmtree, but without its imports (fnmatch and re, bz2, lzma: ~7 ms), without
    recursion, and at most REMOVE_DEPTH levels down: a directory deeper is first moved up
    to the top (a tree of any depth is neither a RecursionError nor out of descriptors)."""
    parent, name = os.path.split(path.rstrip("/"))
    try:
        top = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    levels = [(top, [name], None)]      # (directory, names in it left to remove, its name)
    try:
        while levels:
            fd, names, own = levels[-1]
            if names:
                entry = names.pop()
                inner = unlink_or_open(fd, entry)
                if inner is not None and len(levels) > REMOVE_DEPTH:
                    os.close(inner)
                    moved = f".bw-deep.{os.urandom(4).hex()}"
                    with suppress(OSError):
                        os.rename(entry, moved, src_dir_fd=fd, dst_dir_fd=levels[1][0])
                        levels[1][1].append(moved)
                elif inner is not None:
                    levels.append((inner, safe_listdir(inner), entry))
                continue
            levels.pop()
            if own is not None:
                os.close(fd)
                with suppress(OSError):
                    os.rmdir(own, dir_fd=levels[-1][0])
    finally:
        for fd, _, own in levels:
            if own is not None:
                os.close(fd)
        os.close(top)


def unlink_or_open(dir_fd, name):
    """Unlink `name` in dir_fd; when it is a directory, a descriptor to empty it with (made
    0700 first), else None."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return None
    except IsADirectoryError:
        pass
    except OSError:
        return None
    try:
        path_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        via = f"/proc/self/fd/{path_fd}"
        with suppress(OSError):
            if stat.S_IMODE(os.stat(via).st_mode) & 0o700 != 0o700:
                os.chmod(via, 0o700)
        return os.open(via, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    finally:
        os.close(path_fd)


def safe_listdir(fd):
    try:
        return os.listdir(fd)
    except OSError:
        return []


def could_be_made(path, error):
    """Whether the sandbox could create `path` although we failed to: not when the
    filesystem is read-only, the parent is not a directory (it is pinned), or the nearest
    existing directory is someone else's and not writable (no chmod can open it)."""
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


def open_dir_beneath(root, parts, create=False):
    """A descriptor of the directory root/parts..., each part opened with O_NOFOLLOW (a link
    is refused); missing parts (and root) are made (0700) when `create`.  None when that
    fails.  open_beneath's walk is the same, but yields O_PATH descriptors (which cannot be
    listed or read) and stops the session at a link; here a link only means "not there"."""
    if create:
        with suppress(OSError):
            os.mkdir(root, 0o700)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    for part in parts:
        try:
            if create:
                with suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = inner
    return fd


def read_at(dir_fd, name, limit=STATE_FILE_LIMIT):
    """The bytes of regular file `name` in dir_fd (None: the working directory), never
    through a link; None for anything else (a directory, a fifo) or a larger file."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def same_file(info, path):
    try:
        other = os.stat(path)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (other.st_dev, other.st_ino)


def read_limited(fd, limit):
    """All of fd (blocking, as a pipe needs), or None past `limit` bytes."""
    chunks, size = [], 0
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


# ---------------------------------------------------------------------------------------------
# Mount planning: what the sandbox sees of the home, the project and the extra paths
# ---------------------------------------------------------------------------------------------

def home_mounts(profile, home, full_home, entries, exists=os.path.lexists, bind_state=False):
    """Binds that populate the session's home; `entries` lists the real home.  The CLI's
    state is the session's own copy (seed_state), unless `bind_state`
    (--allow-config-writes): then the host's, read-write."""
    mounts = [("--bind", os.path.join(home, d), os.path.join(home, d))
              for d in profile.state_dirs if bind_state]
    files = [f for p in PROFILES.values() for f in top_state_files(p)]
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
    """Refuse a project or extra bind (`path`, canonical) that would expose the home, a
    secret or the CLIs' own settings and state on the host (host_config(): a dotfiles
    repository they link into counts too), the home compared as given and as its real
    path ($HOME may be a link)."""
    homes = list(dict.fromkeys([home, os.path.realpath(home)]))
    if any(is_within(h, path) for h in homes):
        raise Failure(f"{flag} {path}: that is your home directory or above it; "
                      "choose a project directory")
    for relative in hidden:
        for secret in (os.path.join(h, relative) for h in homes):
            if is_within(path, secret) or (os.path.lexists(secret)
                                           and is_within(path, os.path.realpath(secret))):
                raise Failure(f"{flag} {path}: secrets (~/{relative}) are never shown in the "
                              "sandbox")
    # A secret below `path` is hidden by a mount (secret_masks); the CLIs' settings and state
    # are refused there too: a file missing now could be made, and a writable one rewritten.
    for relative in host_config():
        for place in (os.path.join(h, relative) for h in homes):
            real = os.path.realpath(place) if os.path.lexists(place) else None
            if is_within(path, place) or (real and (is_within(path, real)
                                                     or is_within(real, path))):
                raise Failure(f"{flag} {path}: the CLIs' settings and state (~/{relative}) run "
                              "code on the host and are never shown in the sandbox")


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


def writable_roots(project, home, profile, extra=()):
    """The sandbox-writable trees, as (path as mounted, real path) pairs: the CLI's state
    directories, the --allow-rw directories and the project."""
    paths = [os.path.join(home, d) for d in profile.state_dirs] + [*extra, project]
    return [(p, os.path.realpath(p)) for p in dict.fromkeys(paths)]


def wrapper_files(bwrap=None):
    """What runs on the host when the wrapper does: its directory (with the bytecode cache),
    each of its files, the interpreter and its standard library, and bwrap, every one with
    the links that lead to it."""
    files = [__file__, FILTER_SCRIPT, BRIDGE_SCRIPT, sys.argv[0], sys.executable,
             os.path.dirname(os.__file__), bwrap]
    return [os.path.abspath(p) for f in files if f for p in symlink_chain(os.path.abspath(f))]


def refuse_wrapper_inside(roots, bwrap=None):
    """Nothing that runs on the host when the wrapper does (wrapper_files) may lie where the
    sandbox can write, nor may a writable root lie inside the wrapper's directory: a session
    could change the code that runs on the host the next time (a project's activated venv
    holds the python3 the entry scripts start with)."""
    files = wrapper_files(bwrap)
    for mounted, real in roots:
        for base in dict.fromkeys((mounted, real)):
            inside = next((p for p in files if is_within(p, base)), None)
            if inside is None and is_within(base, HERE):
                inside = HERE
            if inside is not None:
                raise Failure(f"{inside} runs on the host with this wrapper, and the sandbox "
                              f"could write there ({base}): a session could change it for "
                              "the next one; keep bw-claude, bw_lib.py, socks_filter.py, "
                              "socat_bridge.sh, the python3 that runs them and bwrap elsewhere "
                              "(e.g. ~/bin, /usr/bin)")


def check_chain(chain, roots):
    """Refuse a program whose symlinks, where the sandbox can write them, lead out of that
    place: the next session would show whatever they name."""
    for hop, target in zip(chain, chain[1:]):
        where = root_of(hop, roots)
        if where and (root_of(target, roots) or (None,))[0] != where[0]:
            raise link_refusal(hop, "a program the session runs")


def check_given(flag, path, roots):
    """An --allow-ro/--allow-rw path given below a writable root must not go through a link
    planted there."""
    where = root_of(os.path.abspath(path), roots)
    if where:
        link = planted_link(where[0], os.path.join(*where))
        if link is not None:
            raise link_refusal(link, f"the {flag} directory")


# ---------------------------------------------------------------------------------------------
# Protected paths: never followed, bound as they were checked
# ---------------------------------------------------------------------------------------------

# The project, the --allow-rw directories and the CLI's state are the sandbox's to write, for
# this session and the ones before it, so a path below them may be a link it planted
# (`sub/.git -> ../../..`).  Every mount source below such a root is walked component by
# component with O_NOFOLLOW: a symlink stops the session with one line naming it, and what
# was checked is what bwrap binds (an O_PATH descriptor, --ro-bind-fd / --bind-fd; bwrap
# compares the mount with the descriptor afterwards).  Placeholders are made and removed
# through descriptors of their checked parents.  Sessions sharing a root hold a shared
# flock on a lock file of that root for their whole life, in a directory of the user's the
# sandbox cannot see (LOCKS_DIR); the one that can take it exclusively (at its end, or at
# the next start after a SIGKILL) removes the placeholders the sessions listed, so no
# session's end or crash takes away a mount another still stands on.

def not_writable(plan, root, path, error):
    """Say which directory is not writable and what to do."""
    what = ("the project" if root == plan.project else
            f"{plan.profile.name}'s state directory" if is_within(root, plan.home) else
            "the --allow-rw directory")
    return (f"{what} {root} is not writable ({error.strerror}), so {path} cannot be held "
            f"read-only for the session: make it writable (chmod u+w {shlex.quote(root)}), or "
            "run with --allow-config-writes to go without that protection")


def glob_paths(base, pattern):
    """What the PROTECTED_GLOBS `pattern` (a relative path with one "*", in its last part)
    names below `base`, sorted; `base` is taken as it is, [ and * in it included."""
    parent, _, name = pattern.rpartition("/")
    head, _, tail = name.partition("*")
    directory = os.path.join(base, parent)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, n) for n in names
                  if len(n) >= len(head) + len(tail) and n.startswith(head) and n.endswith(tail))


def protection(project, home, rw_roots, extra=(), nested=(), exists=os.path.lexists,
               isdir=None, glob=None, whole=()):
    """What keeps PROTECTED_* read-only: (mounts, placeholders to create first).

    PROTECTED_PROJECT applies to the project and to each of `extra` (the --allow-rw
    directories); its .git entries to each of `nested` (repositories below them).  Of
    `whole` (other CLIs' config directories), one that is missing is held read-only whole:
    one placeholder instead of one for it and one for each protected path in it.  Each
    protected path is bound read-only onto itself; the directories between it and its
    writable root are bound onto themselves, which pins them (a mount point cannot be
    renamed, so `mv .git x` cannot carry the protection away).
    """
    isdir = isdir or is_real_dir     # a link to a directory is a link (bind_checked refuses it)
    glob = glob or glob_paths
    bases = list(dict.fromkeys([project, *extra]))
    wanted = []
    for base in bases + [n for n in nested if n not in bases]:
        git = os.path.join(base, ".git")
        if exists(git) and not isdir(git):
            wanted.append((base, ".git"))      # a gitdir: pointer file
        wanted += [(base, p) for p in PROTECTED_PROJECT
                   if base in bases or p.startswith(".git/")]
    for base in bases:
        for pattern in PROTECTED_GLOBS:
            wanted += [(base, os.path.relpath(p, base))
                       for p in glob(base, pattern)]
        for top in whole:
            if not exists(os.path.join(base, top)):
                wanted = [w for w in wanted if not (w[0] == base and w[1].startswith(top + "/"))]
                wanted.append((base, top + "/"))
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


LOCKS_DIR = "bw-locks.{uid}"        # under private_base(): one per user, shared by the tools
LOCK_FILE = ".lock"                 # NAME.lock: held by every session of the root NAME
LIST_FILE = ".list"                 # NAME.list: the root, then its placeholders, NUL-separated
JSON_LIST_FILE = ".json"            # NAME.json: the same as JSON, left by an earlier version

LOCK_SECONDS = 10                   # bound on waiting for another session's start or end
FD_OPTIONS = {"--ro-bind": "--ro-bind-fd", "--bind": "--bind-fd"}


def bind_checked(mounts, roots, placeholders=(), lstat=os.lstat):
    """`mounts` with every bind whose source lies below a writable root turned into a bind
    of a descriptor (FD_OPTIONS), and {source: (real root, relative, is a directory)} saying
    what to open; a symlink on the way to one refuses the session."""
    result, beneath = [], {}
    dirs = {p.rstrip("/") for p in placeholders if p.endswith("/")}
    for option, source, dest in mounts:
        where = root_of(source, roots) if source and option in FD_OPTIONS else None
        if where is None:
            result.append((option, source, dest))
            continue
        link = planted_link(where[0], os.path.join(*where), lstat)
        if link is not None:
            raise link_refusal(link)
        try:
            is_dir = stat.S_ISDIR(lstat(os.path.join(*where)).st_mode)
        except OSError:
            is_dir = option == "--bind" or source in dirs
        beneath[source] = (*where, is_dir)
        result.append((FD_OPTIONS[option], source, dest))
    return result, beneath


def make_placeholder(root, relative, is_dir):
    """Create the empty placeholder root/relative in its checked parent (O_EXCL, no link)."""
    fd, name = parent_beneath(root, relative)
    try:
        if is_dir:
            os.mkdir(name, 0o755, dir_fd=fd)
            return
        new = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                      dir_fd=fd)
        with os.fdopen(new, "wb") as f:
            f.write(placeholder_content(os.path.join(root, relative)))
    finally:
        os.close(fd)


def remove_placeholder(root, relative):
    """Remove a placeholder still as it was made (an empty directory, or the exact content);
    anything else the sandbox put there stays, and no link is followed."""
    with suppress(OSError, Failure):
        fd, name = parent_beneath(root, relative)
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                os.rmdir(name, dir_fd=fd)
            elif stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                data = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
                with os.fdopen(data, "rb") as f:
                    same = f.read(64) == placeholder_content(os.path.join(root, relative))
                if same:
                    os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)


def root_identity(root):
    """A writable root's name in LOCKS_DIR: its device and inode."""
    info = stat_or_none(root)
    return None if info is None else f"{info.st_dev:x}-{info.st_ino:x}"


def flock_until(fd, operation, seconds=LOCK_SECONDS):
    """flock, retried without blocking for at most `seconds`; False if it never came."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


class RootLock:
    """One writable root's lock file (held shared for the session's life) and its list of
    placeholders, both in LOCKS_DIR under a name made of the root's device and inode.
    Joining, listing and leaving happen only while the locks directory itself is locked
    (Protection), so the exclusive tries never race each other."""

    def __init__(self, locks_fd, root, name=None):
        self.root, self.locks_fd, self.fd = root, locks_fd, None
        self.name = name or root_identity(root)

    def listed(self):
        """The placeholders listed for this root, from the list file (ours, in LOCKS_DIR)."""
        return self.read_list()[1:]

    def read_list(self):
        """The root's list file as [root, placeholder...], [] unless it is a regular file
        of ours (or the JSON one a session of an earlier version left when killed).
        LOCKS_DIR is never shown in the sandbox (refuse_wrapper_place); this is one more
        line should anything else have written there."""
        data = self.read_own(LIST_FILE)
        if data:
            return [os.fsdecode(p) for p in data.split(b"\0")]
        found = parse_json(self.read_own(JSON_LIST_FILE) or b"")
        if not isinstance(found, dict) or not isinstance(found.get("root"), str):
            return []
        return [found["root"], *(p for p in found.get("placeholders", ()) if isinstance(p, str))]

    def read_own(self, suffix):
        with suppress(OSError):
            fd = os.open(self.name + suffix, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                         dir_fd=self.locks_fd)
            with os.fdopen(fd, "rb") as f:
                info = os.fstat(fd)
                if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                    return f.read(STATE_FILE_LIMIT)
        return None

    @classmethod
    def sweep(cls, locks_fd):
        """Clean every root whose sessions all ended without cleaning (SIGKILL), wherever
        the session starting now runs."""
        names = {e.rpartition(".")[0] for e in os.listdir(locks_fd)
                 if e.endswith((LIST_FILE, JSON_LIST_FILE, LOCK_FILE))}
        for name in sorted(names):
            lock = cls(locks_fd, "", name)
            lock.root = (lock.read_list() or [""])[0]
            with suppress(OSError):
                lock.fd = os.open(name + LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600,
                                  dir_fd=locks_fd)
                lock.leave()

    def join(self):
        """Hold the root shared; when no other session holds it, first remove what sessions
        killed with SIGKILL left.  (A failed conversion to exclusive would drop a lock
        already held, so the exclusive try comes first.)"""
        self.fd = os.open(self.name + LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600,
                          dir_fd=self.locks_fd)
        self.clear_if_alone()
        if not flock_until(self.fd, fcntl.LOCK_SH):
            raise Failure(f"another session of {self.root} holds its lock for more than "
                          f"{LOCK_SECONDS} s; try again")

    def note(self, relatives):
        """Add placeholders to the root's list before they are made."""
        if not relatives:
            return
        names = [*self.listed(), *relatives]
        fd = os.open(self.name + LIST_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                     0o600, dir_fd=self.locks_fd)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0".join(map(os.fsencode, [self.root, *names])))

    def clear_if_alone(self):
        """clear() when the lock can be taken exclusively (no other session holds the root);
        whether it could."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.clear()
        return True

    def clear(self):
        """With the lock held exclusively: remove the listed placeholders, deepest first
        (only while the root, a canonical path, is still the directory the list was made
        for)."""
        if root_identity(self.root) == self.name and os.path.realpath(self.root) == self.root:
            for relative in sorted(set(self.listed()), key=lambda p: -p.count("/")):
                remove_placeholder(self.root, relative)
        for suffix in (LIST_FILE, JSON_LIST_FILE):
            with suppress(OSError):
                os.unlink(self.name + suffix, dir_fd=self.locks_fd)

    def leave(self):
        """The session is over: the last one out removes the placeholders and the files."""
        if self.fd is None:
            return
        # A failed conversion drops the shared lock: nothing of ours needs it any more.
        if self.clear_if_alone():
            with suppress(OSError):
                os.unlink(self.name + LOCK_FILE, dir_fd=self.locks_fd)
        os.close(self.fd)
        self.fd = None


class Protection:
    """What keeps one session's protected paths in place: a shared lock on every writable
    root it protects something in, the placeholders it needed, and the descriptors bwrap
    binds (closed once bwrap has them).  The plan is not changed: what could not be held
    (a placeholder neither we nor the sandbox can make) is left out by mounts()."""

    def __init__(self, plan, locks_base):
        self.plan, self.fds, self.locks, self.locks_fd = plan, {}, [], None
        self.beneath = dict(plan.beneath)   # what is still to hold
        self.dropped = []                   # sources whose placeholder cannot be made
        self.locks_path = os.path.join(locks_base, LOCKS_DIR.format(uid=os.geteuid()))
        self.roots = list(dict.fromkeys(root for root, _, _ in plan.beneath.values()))

    def hold(self):
        """Lock the roots, make the placeholders needed now (another session may have
        removed some since the plan was made) and open the descriptors.  A placeholder that
        cannot be made where the sandbox could make one stops the session."""
        if not self.roots:
            return self
        self.lock_directory()
        try:
            self.hold_locked()
        finally:
            fcntl.flock(self.locks_fd, fcntl.LOCK_UN)
        return self

    def lock_directory(self):
        """Open and lock LOCKS_DIR, the one still at its name (the last session out may
        have removed the one we waited for)."""
        base, name = os.path.split(self.locks_path)
        for _ in range(100):
            fd = private_subdir(base, name)
            if not flock_until(fd, fcntl.LOCK_EX):
                os.close(fd)
                raise Failure(f"{self.locks_path} stayed locked for more than {LOCK_SECONDS} "
                              "s; try again")
            with suppress(FileNotFoundError):
                if os.stat(self.locks_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    self.locks_fd = fd
                    return
            os.close(fd)
        raise Failure(f"cannot lock {self.locks_path}")

    def hold_locked(self):
        RootLock.sweep(self.locks_fd)
        by_root = {}
        for root in self.roots:
            lock = RootLock(self.locks_fd, root)
            lock.join()
            self.locks.append(lock)
            by_root[root] = lock
        found = {}
        try:
            self.open_all(by_root, found)
        except BaseException:
            for fd in found.values():
                if fd is not None:
                    os.close(fd)
            raise

    def open_all(self, by_root, found):
        """Open every checked source into `found`, making the placeholders missing now."""
        plan, missing = self.plan, []
        for source in sorted(plan.beneath, key=lambda p: p.count("/")):
            fd = open_beneath(*plan.beneath[source][:2])
            if fd is None:
                missing.append(source)
            else:
                found[source] = fd
        # Listed before they are made, so that a crash right after leaves nothing unknown.
        for root, lock in by_root.items():
            lock.note([plan.beneath[s][1] for s in missing if plan.beneath[s][0] == root])
        for source in missing:
            if source not in self.beneath:      # dropped with a parent that cannot be made
                continue
            root, relative, is_dir = self.beneath[source]
            if self.make(root, relative, is_dir, source):
                found[source] = open_beneath(root, relative)
                if found[source] is None:
                    raise Failure(f"{source} vanished while the session started; try again")
        mounted = {m[1] for m in plan.mounts if not self.is_dropped(m[2])}
        for source, fd in list(found.items()):
            del found[source]
            if fd is not None and source in mounted and source in self.beneath:
                self.fds[source] = fd
            elif fd is not None:
                os.close(fd)        # a guarded file's place: held, bound as a copy

    def is_dropped(self, dest):
        return any(is_within(dest, source) for source in self.dropped)

    def mounts(self):
        """The plan's mounts that bwrap makes: those of what could not be held left out."""
        return [m for m in self.plan.mounts if not self.is_dropped(m[2])
                and (m[1] not in self.plan.beneath or m[1] in self.fds)]

    def make(self, root, relative, is_dir, source):
        """Make one placeholder; False when neither we nor the sandbox can create it (its
        mounts go)."""
        try:
            make_placeholder(root, relative, is_dir)
        except FileExistsError:
            pass
        except OSError as error:
            if could_be_made(source, error):
                raise Failure(not_writable(self.plan, root, source, error)) from None
            self.dropped.append(source)
            for path in [p for p in self.beneath if is_within(p, source)]:
                del self.beneath[path]
            return False
        return True

    def close_fds(self):
        for fd in self.fds.values():
            with suppress(OSError):
                os.close(fd)
        self.fds = {}

    def release(self):
        """The session is over: leave every root (the last one out cleans) and remove the
        locks directory when it is empty."""
        self.close_fds()
        if self.locks_fd is None:
            return
        # Our lock files keep the directory from being removed: it is the one at its name.
        flock_until(self.locks_fd, fcntl.LOCK_EX)
        for lock in self.locks:
            with suppress(OSError):
                lock.leave()
        self.locks = []
        with suppress(OSError):
            os.rmdir(self.locks_path)
        os.close(self.locks_fd)
        self.locks_fd = None


def placeholder_content(path):
    if path.endswith("/.git/commondir"):
        return PLACEHOLDER_COMMONDIR
    return PLACEHOLDER_JSON if path.endswith(".json") else b""


# ---------------------------------------------------------------------------------------------
# The wrapper's own places: never shown in the sandbox
# ---------------------------------------------------------------------------------------------

# Each tool's session base (other sessions' homes, their copies of the CLI's credentials and
# transcripts) and the runtime base (private_base: the proxies' socket directories, and
# LOCKS_DIR, whose lists say which placeholders the next start removes) let one session reach
# another.  Showing one, a parent of one, or one of the wrapper's entries inside the runtime
# base is refused: an empty mount over it would not do, as the sandbox could rename its
# parent away and the next session would make its directory where the sandbox reads it.
# Paths are compared canonical (realpath), since any of them may be reached through a link.

def private_base(environ):
    """$XDG_RUNTIME_DIR, else the temporary directory: the first of $TMPDIR, /tmp, /var/tmp
    that is a directory we can make something in (as tempfile.gettempdir chooses); each
    only if no one else can move what is made in it (owned_base)."""
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and owned_base(runtime):
        return runtime
    for base in (environ.get("TMPDIR", ""), "/tmp", "/var/tmp"):
        if os.path.isabs(base) and owned_base(base) and can_make_in(base):
            return base
    return "/tmp"


def owned_base(path):
    """Whether `path` is a directory of ours or root's that no one else may change, or a
    sticky one (/tmp): where another user cannot rename a session's directory away and put
    one of theirs, with a socket of theirs, in its place."""
    info = stat_or_none(path)
    return (info is not None and stat.S_ISDIR(info.st_mode)
            and info.st_uid in (os.geteuid(), 0)
            and (not info.st_mode & 0o022 or bool(info.st_mode & stat.S_ISVTX)))


MAKEABLE = {}     # can_make_in's answers: asked often, tried once a process


def can_make_in(directory):
    """Whether a file can be made in `directory` (tried, as access() answers yes to root)."""
    if directory not in MAKEABLE:
        probe = os.path.join(directory, f".bw-probe.{os.urandom(4).hex()}")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o600))
            MAKEABLE[directory] = True
            os.unlink(probe)
        except OSError:
            MAKEABLE.setdefault(directory, False)
    return MAKEABLE[directory]


def make_private_dir(base, tool):
    """A 0700 directory for one session, locked for as long as this process lives.

    It is made under a hidden name and renamed once locked, so sweep_stale never sees
    it unlocked.  Returns (path, fd holding the lock).
    """
    for _ in range(100):
        hidden = os.path.join(base, f".{tool}.{os.urandom(4).hex()}")
        with suppress(FileExistsError):
            os.mkdir(hidden, 0o700)
            break
    else:
        raise FileExistsError(f"no free name for a session directory in {base}")
    fd = os.open(hidden, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    path = os.path.join(base, os.path.basename(hidden)[1:])
    os.rename(hidden, path)
    return path, fd


def session_base(environ, tool):
    """Where sessions keep their homes, caches and logs: $XDG_CACHE_HOME/TOOL (when absolute)
    or ~/.cache/TOOL, on disk; $XDG_RUNTIME_DIR is a small tmpfs that a session's caches
    would fill.  Only the proxy's socket goes there."""
    base = environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(environ.get("HOME", ""), ".cache")
    return os.path.join(base, tool)


def checked_session_base(environ, tool, create=True):
    """session_base, made (0700) when missing and checked without following a link: a
    directory of ours that nobody else can enter.  None when it cannot be made (a read-only
    home): sessions then live in the runtime directory, as the socket does."""
    path = session_base(environ, tool)
    if create:
        with suppress(OSError):
            os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise Failure(f"{path}: {error.strerror.lower()}; it must be a directory of yours "
                      "(mode 0700), not a link: remove it") from None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise Failure(f"{path}: must be yours with mode 0700 (it is uid {info.st_uid}, mode "
                      f"{stat.S_IMODE(info.st_mode):04o}): chmod 700 it, or remove it")
    return path


def session_dirs_base(environ, tool):
    """The base of the session's directory: on disk when it can be, else the runtime one."""
    return checked_session_base(environ, tool) or private_base(environ)


def session_masks(environ, mounts, create=True):
    """The wrapper's places (wrapper_places) hold other sessions' homes, caches, logs,
    sockets and locks: a bind that shows one, or something of the wrapper's inside one, is
    refused, except a read-only bind above one (--full-home-access, a tool's directory),
    whose read-only parents cannot be renamed away from under the empty mount made over
    the place.  A session base is made first when missing, so one made later cannot
    appear."""
    masks = []
    for place, own, tool in wrapper_places(environ):
        for option, src, dest in mounts:
            real = os.path.realpath(src) if src else None
            shown = real and place_shown(real, place, own)
            if shown == "inside" or (shown and option not in ("--ro-bind", "--ro-bind-fd")):
                raise Failure(wrapper_place_refusal(src, place, tool, environ))
            if not shown or (create and own is None
                             and checked_session_base(environ, tool) is None):
                continue        # not shown, or it cannot be made: nor can a session make it
            mask = ("--tmpfs", None, os.path.normpath(os.path.join(
                dest, os.path.relpath(place, real))))
            if mask not in masks:
                masks.append(mask)
    return masks


def wrapper_places(environ):
    """[(canonical path, names of the wrapper's entries in it or None for all of it, the
    tool)] of every tool's session base and of the runtime base."""
    tools = [p.tool for p in PROFILES.values()]
    places = [(os.path.realpath(session_base(environ, t)), None, t) for t in tools]
    own = (LOCKS_DIR.format(uid=os.geteuid()), *tools)
    return places + [(os.path.realpath(private_base(environ)), own, tools[0])]


def place_shown(real, place, own):
    """How showing the canonical path `real` shows `place`: "above" (it or a parent of
    it), "inside" (in it, in one of its `own` entries when given: a session's directory,
    hidden while it is made, or LOCKS_DIR), or None."""
    if is_within(place, real):
        return "above"
    if not is_within(real, place):
        return None
    first = os.path.relpath(real, place).split("/")[0].lstrip(".")
    if own is None or any(first == o or first.startswith(o + ".") for o in own):
        return "inside"
    return None


def wrapper_place_refusal(path, place, tool, environ):
    if place == os.path.realpath(private_base(environ)):
        what = "the sessions' proxy sockets and locks are there"
        fix = ("" if environ.get("XDG_RUNTIME_DIR") else
               ", or set XDG_RUNTIME_DIR to a private directory of yours")
    else:
        what, fix = f"{tool} keeps its sessions' homes there", ""
    return (f"{path}: {what} ({place}), so a session shown it could reach the others; "
            f"choose a directory neither inside nor above it{fix}")


def refuse_wrapper_place(flag, path, environ):
    """Refuse --dir, --allow-ro or --allow-rw `path` (canonical) that shows a wrapper
    place, and a writable one that shows a tool's configuration directory: every later
    start reads its defaults file and allow list (reading them is harmless)."""
    for place, own, tool in wrapper_places(environ):
        if place_shown(path, place, own):
            raise Failure(f"{flag} {wrapper_place_refusal(path, place, tool, environ)}")
    for tool in (p.tool for p in PROFILES.values()):
        place = os.path.realpath(config_dir(environ, tool))
        if flag != "--allow-ro" and place_shown(path, place, None):
            raise Failure(f"{flag} {path}: {tool} reads its options and allow list there "
                          f"({place}) at every start, so a session could loosen the next "
                          "one; choose a directory neither inside nor above it")


# ---------------------------------------------------------------------------------------------
# The allow list: rules from options, presets and allow files
# ---------------------------------------------------------------------------------------------

def preset_rules(names):
    """The rules of the named presets, each once, in order."""
    return list(dict.fromkeys(rule for name in names for rule in PRESETS[name][1]))


def rules_module():
    """socks_filter, for its pure rule and name functions and its table of log reasons (never
    its SOCKS parsing)."""
    try:
        import socks_filter
    except ImportError:
        raise Failure(f"{FILTER_SCRIPT} is missing; {keep_beside(FILTER_SCRIPT)}") \
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


def host_port_rule(port):
    """The exact IP rule that lets the proxy reach the host's 127.0.0.1:PORT."""
    return f"127.0.0.1:{port}"


def loopback_hints(allow):
    """For each rule naming the sandbox's own 127.0.0.1 or ::1 (inside --unshare-net, where
    NO_PROXY keeps them away from the proxy anyway): a hint pointing at --host-port."""
    if not allow:
        return []
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


ALLOW_FILE_LIMIT = 16 << 20


def allow_file_rules(path, writable):
    """The rules of one --allow-file, read once here and handed to the proxy as rules, so a
    pipe (--allow-file <(...)) works.  Any readable file but a directory; never one the
    sandbox can write (`writable`: the project, --allow-rw directories, the CLI's state), nor
    reached through a link there: a session could have changed it to widen the next one's
    network."""
    filters = rules_module()
    for place in (os.path.abspath(path), os.path.realpath(path)):
        root = next((r for r in writable if is_within(place, r)
                     or is_within(place, os.path.realpath(r))), None)
        if root is not None:
            raise Failure(f"--allow-file {path}: it is in {root}, which the sandbox can write, "
                          "so a session could have changed it; keep allow files elsewhere "
                          "(e.g. ~/.config/)", 2)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        raise Failure(f"--allow-file {path}: {error.strerror.lower()}", 2) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise Failure(f"--allow-file {path}: a directory, not a file of rules", 2)
        if stat.S_ISREG(info.st_mode) and not same_file(info, os.path.realpath(path)):
            raise Failure(f"--allow-file {path}: it changed while being opened", 2)
        data = read_limited(fd, ALLOW_FILE_LIMIT)
    finally:
        os.close(fd)
    if data is None:
        raise Failure(f"--allow-file {path}: larger than {ALLOW_FILE_LIMIT >> 20} MiB", 2)
    # socks_filter parses it (one parser), from a copy in memory.
    copy = os.memfd_create("allow-file", os.MFD_CLOEXEC)
    where = f"/proc/self/fd/{copy}"
    try:
        os.write(copy, data)
        return [rule.text for rule in filters.read_rule_file(where)]
    except filters.RuleError as error:
        raise Failure(f"bad allow rule: {printable(str(error).replace(where, path))}", 2) \
            from None
    finally:
        os.close(copy)


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


# ---------------------------------------------------------------------------------------------
# The plan: every decision about one session, made before anything starts
# ---------------------------------------------------------------------------------------------

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
    etc_files: tuple = ()       # of etc: copied in (bwrap --file) rather than bound
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
    sockets_complete: bool = True                   # the socket and repository walks
                                                    # saw everything
    verbose: bool = False
    dry_run: bool = False
    state: list = field(default_factory=list)       # State items, SLUG filled in
    allow_file_rules: list = field(default_factory=list)  # the allow files' rules, read once
    beneath: dict = field(default_factory=dict)     # fd-bound source: (real root, relative,
                                                    # is a directory), see bind_checked
    git_roots: list = field(default_factory=list)   # checked for git metadata at the end
    host_ports: list = field(default_factory=list)  # --host-port: (inside, host port)
    proxy_token: str = None                         # --share-net: the proxy's password
    environ: dict = field(default_factory=dict)     # the wrapper's environment, HOME checked
    early_proxy: object = None      # a ProxyInterpreter started before the plan (Wrapper.plan)


def make_plan(profile, opts, environ, skip=(), host=None):
    """Decide the session from the options and the Host facts: the plan_* steps below, in
    order, each refusing what it cannot allow before anything starts."""
    host = host or probe_host(environ)
    home, project = plan_project(profile, opts, environ)
    command, programs = plan_command(profile, opts, home, host, skip)
    mounts, rw_extra = plan_shown(profile, opts, home, project, environ)
    sockets, walked = plan_sockets(profile, home, mounts)
    roots = writable_roots(project, home, profile, rw_extra)
    mounts += plan_programs(programs, roots, home, host.bwrap)
    mounts.append(("--bind", project, project))
    mounts += secret_masks(home, mounts, hidden=hidden_paths(profile))
    mounts += session_masks(environ, mounts, create=not opts.dry_run)
    mounts += sockets
    placeholders, beneath = [], {}
    if not opts.allow_config_writes:
        mounts, placeholders, beneath, whole = plan_protection(profile, project, home, mounts,
                                                               rw_extra, roots)
        walked = walked and whole
    allow, allow_files, file_rules = plan_allow(profile, opts, environ, home, mounts)
    learn, proxy_log = plan_outputs(opts, roots)
    token = advisory_token(opts)
    return Plan(
        profile=profile, home=home, project=project, command=command,
        env=with_token(build_env(profile, environ, home, opts.pass_env, opts.env,
                                 defaults=inside_env(opts.filter_network)), token),
        bwrap=host.bwrap or "bwrap", system=host.system, etc=host.etc,
        etc_files=host.etc_files, mounts=mounts,
        unshare_net=opts.unshare_net, filter=opts.filter_network, allow=allow,
        allow_files=allow_files, allow_private=opts.allow_private, learn=learn,
        proxy_log=proxy_log, socat=host.socat or "socat", env_program=host.env_program,
        seccomp=tiocsti_filter(os.uname().machine), disable_userns=host.disable_userns,
        placeholders=placeholders, sockets_complete=walked, verbose=opts.verbose,
        dry_run=opts.dry_run, allow_file_rules=file_rules,
        state=state_items(profile, project, opts.allow_config_writes), beneath=beneath,
        git_roots=[] if opts.allow_config_writes else [project, *rw_extra],
        host_ports=opts.host_port, proxy_token=token)


def plan_project(profile, opts, environ):
    """(home, project): $HOME checked, and the project directory, which must not show the
    home, a secret or the wrapper's own places."""
    home = checked_home(environ)
    project = os.path.realpath(opts.dir or os.getcwd())
    if not os.path.isdir(project):
        raise Failure(f"--dir {opts.dir}: not a directory")
    refuse_path("--dir", project, home, hidden_paths(profile))
    refuse_wrapper_place("--dir", project, environ)
    return home, project


def plan_command(profile, opts, home, host, skip):
    """(the command the sandbox runs, the host programs it needs shown): the CLI with its
    arguments, or a shell with --shell; the CLI's helpers, and socat for the proxy."""
    cli = find_cli(profile, host.search_path, home, skip)
    if cli is None and not opts.shell:
        raise Failure(f"{profile.name} not found (looked in {cli_places(profile)}); install it: "
                      f"{profile.install_hint}", 127)
    programs = [cli] if cli else []
    for helper in profile.helpers:
        found = find_program(helper, host.search_path)
        if found is None and not opts.shell:
            raise Failure(f"{helper} not found on PATH; {profile.name} needs it", 127)
        programs += [found] if found else []
    if opts.filter_network:
        programs.append(host.socat or "socat")
    if opts.shell:
        shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
        return [shell, *opts.args], programs
    extra = [] if opts.no_skip_permissions else list(profile.cli_args)
    return [cli, *extra, *opts.args], programs


def plan_shown(profile, opts, home, project, environ):
    """(mounts, the --allow-rw paths): the session's home, then --allow-ro and --allow-rw,
    each an existing path that shows neither the home, a secret nor the wrapper's places."""
    hidden = hidden_paths(profile)
    entries = showable_entries(home, hidden) if opts.full_home_access else set()
    mounts = home_mounts(profile, home, opts.full_home_access, entries,
                         bind_state=opts.allow_config_writes)
    rw_extra = []
    for flag, option, paths in (("--allow-ro", "--ro-bind", opts.allow_ro),
                                ("--allow-rw", "--bind", opts.allow_rw)):
        for path in paths:
            check_given(flag, path, writable_roots(project, home, profile))
            real = os.path.realpath(path)
            if not os.path.exists(real):
                raise Failure(f"{flag} {path}: no such file or directory")
            refuse_path(flag, real, home, hidden)
            refuse_wrapper_place(flag, real, environ)
            mounts.append((option, real, real))
            if option == "--bind":
                rw_extra.append(real)
    return mounts, rw_extra


def plan_sockets(profile, home, mounts):
    """(masks over the host's unix sockets in the shown trees, walk complete).  Sockets are
    searched for where the user chose to show a tree (--allow-*, the whole home), not in
    the CLI's state or the tool directories: toolchains hold tens of thousands of files and
    no sockets, and walking them would cost every start."""
    skipped = {os.path.join(home, d) for d in (*profile.state_dirs, *HOME_TOOLS)}
    return socket_masks([(src, dest) for _, src, dest in mounts if src and src not in skipped],
                        home, hidden_paths(profile))


def plan_programs(programs, roots, home, bwrap):
    """Read-only mounts of the programs' install trees; refused when one of them, or the
    wrapper itself (with bwrap), lies where the sandbox can write."""
    refuse_wrapper_inside(roots, bwrap)
    mounts = []
    for program in programs:
        check_chain(symlink_chain(program), roots)
        mounts += [("--ro-bind", r, r) for r in install_roots(symlink_chain(program), home)]
    return mounts


def config_dirs(profile):
    """The project directories that hold `profile`'s config (.claude, .gemini)."""
    return {path.split("/")[0] for path in profile.project_config if "/" in path}


def plan_protection(profile, project, home, mounts, rw_extra, roots):
    """(mounts, placeholders, beneath, walk complete): the protected paths bound read-only
    (placeholders for the missing ones; the other CLIs' missing config directories held
    whole: the session's CLI has nothing to write there), then every bind below a
    writable root turned into a bind of what was checked (bind_checked)."""
    rw_roots = [dest for option, _, dest in mounts if option == "--bind"]
    nested, whole = nested_repositories([project, *rw_extra])
    others = set().union(*(config_dirs(p) for p in PROFILES.values() if p is not profile))
    protected, placeholders = protection(project, home, rw_roots, rw_extra, nested,
                                         whole=sorted(others - config_dirs(profile)))
    mounts, beneath = bind_checked(mounts + protected, roots, placeholders)
    return mounts, placeholders, beneath, whole


def plan_allow(profile, opts, environ, home, mounts):
    """(allow rules, allow files, the allow files' rules read once): the profile's API, the
    presets, --allow-domain, --host-port, and the allow files, each rule checked now, since
    the proxy would refuse it later."""
    allow_files, file_rules = [], []
    user_file = config_path({**environ, "HOME": home}, profile.tool, "allowed-domains")
    writable = [dest for option, _, dest in mounts if option == "--bind"]
    writable += [session_base(environ, p.tool) for p in PROFILES.values()]
    for path in ([user_file] if os.path.isfile(user_file) else []) + opts.allow_file:
        if opts.filter_network:
            file_rules += allow_file_rules(path, writable)
        allow_files.append(os.path.abspath(path))
    given = opts.allow_domain + [host_port_rule(host) for _, host in opts.host_port]
    # The profile's and the presets' rules are constants, checked by the tests (and by the
    # proxy at its start); checking only what was given keeps socks_filter's imports (~10 ms)
    # out of a start that has no rules of its own.
    if opts.filter_network and given:
        problems = rule_problems(given)[1]
        if problems:
            raise Failure(f"bad allow rule: {problems[0]}", 2)
    return list(profile.allow) + preset_rules(opts.allow_preset) + given, allow_files, file_rules


def plan_outputs(opts, roots):
    """(--learn file, --proxy-log file), absolute: refused where the wrapper must not write."""
    learn = os.path.abspath(opts.learn) if opts.learn else None
    for flag, given in (("--learn", opts.learn), ("--proxy-log", opts.proxy_log)):
        problem = given and host_file_problem(os.path.abspath(given), roots)
        if problem:
            raise Failure(f"{flag} {given}: will not write there: {problem}")
    log = opts.proxy_log and os.path.abspath(opts.proxy_log)
    where = log and root_of(os.path.join(os.path.realpath(os.path.dirname(log)),
                                         os.path.basename(log)), roots)
    if where:
        raise Failure(f"--proxy-log {opts.proxy_log}: the sandbox can write there "
                      f"({where[0]}), and the summary and --learn read the log back; put it "
                      "outside the project and the --allow-rw directories")
    if learn and (os.path.isdir(learn) or not os.access(os.path.dirname(learn), os.W_OK)):
        raise Failure(f"--learn {opts.learn}: cannot write a file there")
    return learn, os.path.abspath(opts.proxy_log) if opts.proxy_log else None


# ---------------------------------------------------------------------------------------------
# Commands: the sandbox's environment, bwrap's and the proxy's command lines, seccomp,
# and --verbose's description
# ---------------------------------------------------------------------------------------------

def build_env(profile, environ, home, pass_env=(), assignments=(), defaults=()):
    """The sandbox's environment: allow list, profile defaults, `defaults` (inside_env),
    --pass-env, --env."""
    names, prefixes = env_allow_list(ENV_NAMES + profile.env_names)
    env = {name: value for name, value in environ.items()
           if name in names or name.startswith(prefixes)}
    env["HOME"] = home
    env.update(profile.env)
    env.update(defaults)
    env.update((name, environ[name]) for name in pass_env if name in environ)
    env.update(a.partition("=")[::2] for a in assignments)
    return env


def env_allow_list(patterns):
    """(names, prefixes) of variable patterns, each a name or a prefix ending in "*": a set
    and a startswith() away from a decision, without compiling a pattern at every start."""
    return ({p for p in patterns if not p.endswith("*")},
            tuple(p[:-1] for p in patterns if p.endswith("*")))


def inside_env(filter_network, cache=SANDBOX_CACHE):
    """Variables every session sets inside (before --pass-env and --env, which win)."""
    env = {name: f"{cache}/{sub}" if sub else cache for name, sub in CACHE_ENV}
    if filter_network:
        env["NODE_USE_ENV_PROXY"] = "1"
    return env


def with_token(env, token):
    return {**env, TOKEN_VARIABLE: token} if token else env


def proxy_env(plan):
    """The proxy's environment: the wrapper's, plus the password when there is one."""
    return with_token(dict(os.environ), plan.proxy_token)


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


def build_bwrap_args(plan, private_dir, status_fd=None, seccomp_fd=None, socket_dir=None,
                     mount_fds=None, read_only_state=(), mounts=None, etc_fds=None):
    """The bwrap command line.  The environment is not in it: it goes to bwrap as its own
    environment, so API keys never show in `ps`.  What only a prepared session knows comes
    as arguments: its directories, the descriptors of checked mounts (mount_fds) and of the
    /etc files copied in (etc_fds: open_etc_files), the home-relative read-only copies of
    the CLI's state that were seeded (read_only_state), and the plan's mounts less what
    could not be held (mounts: Protection.mounts)."""
    args = [plan.bwrap, *namespace_args(plan.disable_userns, plan.unshare_net),
            "--hostname", plan.profile.tool]
    for path, link in plan.system:
        args += ["--symlink", link, path] if link else ["--ro-bind", path, path]
    # /etc's files are copied into the sandbox's /etc, read-only (the sandbox's own tmpfs):
    # ~30 bind mounts cost bwrap ~4 ms, as each one rereads the growing mount table.
    for path in plan.etc:
        if path not in plan.etc_files:
            args += ["--ro-bind", path, path]
        elif etc_fds is None or path in etc_fds:       # one that would not open: not shown
            args += ["--perms", "0444", "--file", str(etc_fds[path]) if etc_fds else "FD", path]
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/var/tmp"]
    shown = plan.mounts if mounts is None else mounts
    mounts = [("--bind", os.path.join(private_dir, SESSION_HOME), plan.home), *shown,
              ("--bind", os.path.join(private_dir, SESSION_CACHE), SANDBOX_CACHE)]
    mounts += [("--ro-bind", os.path.join(private_dir, SESSION_HOME, relative),
                os.path.join(plan.home, relative)) for relative in read_only_state]
    if plan.filter:
        mounts += [("--ro-bind", BRIDGE_SCRIPT, SANDBOX_BRIDGE),
                   ("--ro-bind", os.path.join(socket_dir or private_dir, PROXY_SOCKET),
                    SANDBOX_SOCKET)]
    # Parents before children, so no mount hides one meant to be on top of it.
    for option, source, dest in sorted(mounts, key=depth):
        if source is None:
            args += [option, dest, "--remount-ro", dest]
        elif source in plan.beneath:        # --dry-run shows FD: opened only to run
            args += [option, str(mount_fds[source]) if mount_fds else "FD", dest]
        else:
            args += [option, source, dest]
    args += ["--chdir", plan.project]
    if status_fd is not None:
        args += ["--json-status-fd", str(status_fd)]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args + ["--", *inner_command(plan)]


def open_etc_files(paths):
    """{path: descriptor} of the /etc files bwrap copies in; one that cannot be opened (gone,
    or readable only by root) is left out, as a bind of it could not be read inside."""
    fds = {}
    for path in paths:
        with suppress(OSError):
            fds[path] = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    return fds


def depth(mount):
    return mount[2].rstrip("/").count("/")


HANDED_LISTENER = 0     # the proxy's listening socket, in the proxy (see ProxyInterpreter.hand)


def build_proxy_args(plan, private_dir, ready_fd, socket_dir=None):
    # -I -S: the proxy needs only the standard library; skipping site-packages and the
    # user's PYTHON* variables saves start-up time and keeps it what this file says.
    # (ProxyInterpreter runs the same, from the bytecode cache, with args[4:] on stdin.)
    # The wrapper binds the socket and hands it over (FilterProxy), so bwrap need not wait.
    args = [sys.executable, "-I", "-S", FILTER_SCRIPT,
            "--listen", os.path.join(socket_dir or private_dir, PROXY_SOCKET),
            "--listen-fd", str(HANDED_LISTENER)]
    for rule in plan.allow + plan.allow_file_rules:
        args.append(f"--allow={rule}")    # = : a rule may start with "-"
    if plan.allow_private:
        args.append("--allow-private")
    if plan.learn:
        args += ["--mode", "audit"]
    if plan.proxy_token:
        args += ["--token-env", TOKEN_VARIABLE]
    return args + ["--log", plan.proxy_log or os.path.join(private_dir, PROXY_LOG),
                   "--ready-fd", str(ready_fd)]


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


def filter_fd(program):
    """A pipe holding the seccomp program for bwrap --seccomp (it is far below a pipe's size)."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, program)
    os.close(write_fd)
    return read_fd


SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "AUTH", "CREDENTIAL")


def format_env_command(env, argv):
    """`env -i VAR=VALUE... argv`, shell-quoted, with secret-looking values hidden."""
    shown = [f"{k}=<hidden>" if any(w in k.upper() for w in SECRET_WORDS) else f"{k}={v}"
             for k, v in sorted(env.items())]
    return shlex.join(["env", "-i", *shown, *argv])


def network_warnings(plan):
    """The loud lines at start for the options that open the network."""
    lines = []
    if plan.learn:
        lines.append("learn mode: the network is OPEN to every " +
                     ("public and private-use address (--allow-private)" if plan.allow_private
                      else "public address (private addresses stay blocked)") +
                     f"; the destinations used go to {plan.learn} at exit")
    elif plan.allow_private:
        lines.append("--allow-private: allowed names may reach private-use addresses (your LAN)")
    if plan.unshare_net:
        own = {host_port_rule(host) for _, host in plan.host_ports}
        lines += loopback_hints([r for r in plan.allow[len(plan.profile.allow):] if r not in own])
    return lines


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
    lines += [f"state: ~/{i.path}: " + ", ".join(filter(None, [
        {"copy": "a copy", "ro": "a read-only copy", "mine": "this project's lines"}.get(i.seed),
        i.back and f"back: {i.back}"])) for i in plan.state]
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


# ---------------------------------------------------------------------------------------------
# CLI state: the session's own copy, and what of it flows back
# ---------------------------------------------------------------------------------------------

# Inside, ~/.claude (~/.gemini) is a directory of the session's private home, not the host's:
# it starts with copies of what the profile's State items seed and is thrown away at exit.
# Per session, not per project: sessions of one project overlap and end in any order, and
# nothing one of them wrote (a session-env hook, a shell snapshot) may reach the next one
# except through the checks below.  Only what a FLOWS_BACK check accepts reaches the host;
# nothing else the CLI or the agent wrote there does.  On the host, the first component (the
# state directory, or ~/.claude.json) may be the user's own link into a dotfiles repository
# and is followed; below it, no link is ever followed, when reading or when writing.

STATE_COPY_ENTRIES = 10000   # files and directories copied for one State item, at most

STATE_COPY_DEPTH = 8
SESSION_BACK_LIMIT = STATE_FILE_LIMIT   # bytes one session may add to transcripts and history
SLUG_LIMIT = 200             # Claude shortens longer names with a hash: not carried then
TRANSCRIPT_SUFFIX = ".jsonl"
# The characters every JSON writer leaves as they are in a string (printable ASCII but " and
# \; a writer may still escape one, e.g. "\/": such a line is then not taken as this project's).
JSON_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7f)) - {'"', "\\"}


def is_transcript_name(name):
    """Whether `name` is a transcript's: a letter or digit, up to 200 more of [A-Za-z0-9_.-],
    then .jsonl."""
    stem = name[:-len(TRANSCRIPT_SUFFIX)]
    return name.endswith(TRANSCRIPT_SUFFIX) and 0 < len(stem) <= 201 and \
        stem[0] in LETTERS_DIGITS and set(stem) <= LETTERS_DIGITS | set("_.-")


def is_installation_id(data):
    """Whether `data` (bytes) is an installation id: 1-64 of [A-Za-z0-9-], then maybe a
    newline."""
    text = data.removesuffix(b"\n").decode("ascii", "replace")
    return 0 < len(text) <= 64 and set(text) <= LETTERS_DIGITS | {"-"}


def project_slug(project):
    """Claude's name for a project under ~/.claude/projects: every character other than
    an ASCII letter or digit becomes "-"."""
    return "".join(c if c in LETTERS_DIGITS else "-" for c in project)


def state_items(profile, project, bind_state=False):
    """The profile's State items for this project: SLUG filled in (an item whose name
    Claude would shorten is left out), and when the host's state is bound (`bind_state`,
    --allow-config-writes) only the files outside it."""
    slug, items = project_slug(project), []
    top = top_state_files(profile)
    for item in profile.state:
        if SLUG in item.path:
            if len(slug) > SLUG_LIMIT:
                continue
            item = State(item.path.replace(SLUG, slug), item.seed, item.back, item.keys)
        if bind_state and item.path not in top:
            continue
        items.append(item)
    return items


def host_place(home, relative):
    """(root, [directories below it], name) of a home-relative state path on the host.
    Only the first component is resolved: it is the user's (a dotfiles link)."""
    first, *rest = relative.split("/")
    top = os.path.realpath(os.path.join(home, first))
    if not rest:
        return os.path.dirname(top), [], os.path.basename(top)
    return top, rest[:-1], rest[-1]


def private_place(private, relative):
    """The same for the session's copy: nothing in it is followed, not even the first."""
    *parts, name = relative.split("/")
    return private, parts, name


def read_place(place):
    """The bytes of the regular file at (root, parts, name), or None."""
    root, parts, name = place
    fd = open_dir_beneath(root, parts)
    if fd is None:
        return None
    try:
        return read_at(fd, name)
    finally:
        os.close(fd)


def host_read(place):
    """The bytes of the host file at `place`, None only when it is absent: one that exists
    but cannot be read whole (larger than STATE_FILE_LIMIT, not a regular file, unreadable,
    a link on the way) raises ValueError, so what flows back never replaces it."""
    data = read_place(place)
    if data is None and host_entry_exists(place[0], [*place[1], place[2]]):
        try:
            info = os.lstat(os.path.join(place[0], *place[1], place[2]))
        except OSError:
            info = None
        if info and stat.S_ISLNK(info.st_mode):
            raise ValueError("it is a symbolic link, which is never followed")
        if info and stat.S_ISREG(info.st_mode) and info.st_size > STATE_FILE_LIMIT:
            raise ValueError(f"the host's file is larger than {STATE_FILE_LIMIT >> 20} MiB, "
                             "so it is not replaced; shorten or move it")
        raise ValueError("the host's file cannot be read whole, so it is not replaced")
    return data


def spend(budget, size):
    """Take `size` bytes of a session's SESSION_BACK_LIMIT ([bytes left]), or refuse."""
    if budget is not None:
        if size > budget[0]:
            raise ValueError(f"the session added more than {SESSION_BACK_LIMIT >> 20} MiB")
        budget[0] -= size


def copy_entry(src_fd, name, dest, budget, level=0):
    """Copy src_fd/name to dest: regular files and directories, nothing through a link and
    no link, device, socket or fifo; `budget` ([entries left]) bounds the whole copy."""
    if budget[0] <= 0:
        return
    budget[0] -= 1
    try:
        info = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
    except OSError:
        return
    if stat.S_ISREG(info.st_mode):
        copy_file(src_fd, name, dest)
    elif stat.S_ISDIR(info.st_mode) and level < STATE_COPY_DEPTH:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=src_fd)
        except OSError:
            return
        try:
            os.mkdir(dest, 0o700)
            for entry in sorted(os.listdir(fd)):
                copy_entry(fd, entry, os.path.join(dest, entry), budget, level + 1)
        finally:
            os.close(fd)


def copy_file(src_fd, name, dest, limit=STATE_FILE_LIMIT):
    """Copy the regular file src_fd/name (never through a link; none over `limit`) to the
    new file dest, as long as it was when opened, in the kernel (copy_file_range: a
    project's transcripts are copied at every start) or else by reading it."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=src_fd)
    except OSError:
        return
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            left = info.st_size
            while left > 0:
                try:
                    copied = os.copy_file_range(fd, out, left)
                except (AttributeError, OSError):   # older kernel, another filesystem
                    copied = os.write(out, os.read(fd, min(left, 1 << 20)))
                if copied == 0:                     # shorter than it was: done
                    break
                left -= copied
        finally:
            os.close(out)
    finally:
        os.close(fd)


def transcript_sizes(private_dir):
    """{file name: size} of the transcripts seeded into a "lines" directory: what the
    session may only append to (lines_update compares those bytes with the host's)."""
    sizes = {}
    fd = open_dir_beneath(private_dir, [])
    if fd is None:
        return sizes
    try:
        for name in os.listdir(fd):
            if is_transcript_name(name):
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode):
                    sizes[name] = info.st_size
    finally:
        os.close(fd)
    return sizes


def find_project_id(root, parts, project, limit=STATE_COPY_ENTRIES):
    """The name of the directory at root/parts whose .project_root names `project` (how
    Gemini finds a project's short id), or None."""
    fd = open_dir_beneath(root, parts)
    if fd is None:
        return None
    try:
        for name in sorted(os.listdir(fd))[:limit]:
            if not is_project_id(name):
                continue
            inner = open_dir_beneath(f"/proc/self/fd/{fd}", [name])
            if inner is None:
                continue
            try:
                owner = read_at(inner, PROJECT_ROOT, 4096)
            finally:
                os.close(inner)
            if owner is not None and owner.strip() == project.encode():
                return name
    finally:
        os.close(fd)
    return None


def with_project_id(items, project_id):
    """`items` with PROJECT_ID filled in; those that need it are left out when it is None."""
    return [State(i.path.replace(PROJECT_ID, project_id), i.seed, i.back, i.keys)
            if PROJECT_ID in i.path else i for i in items
            if project_id is not None or PROJECT_ID not in i.path]


def host_project_id(profile, items, home, project):
    """Gemini's id for this project on the host, if the profile has PROJECT_ID items."""
    if not any(PROJECT_ID in i.path for i in items):
        return None
    root, parts, name = host_place(home, profile.project_ids + "/x")
    return find_project_id(root, parts, project)


def claim_project_id(profile, home, private, project):
    """The id the session's Gemini gave this project, if the host may take its chats under
    it: the host's directory of that id is this project's (its .project_root names it), or
    does not exist yet and no other project has that id in the registry; then it
    is made with its .project_root.  An existing directory is never claimed: one without a
    .project_root may be another project's (Gemini's older sha256 names)."""
    base = profile.project_ids
    project_id = find_project_id(private, base.split("/"), project)
    if project_id is None:
        return None
    root, parts, _ = host_place(home, f"{base}/{project_id}/{PROJECT_ROOT}")
    owner = read_place((root, parts, PROJECT_ROOT))
    registry = parse_json(read_place(host_place(home, profile.project_registry)) or b"{}")
    ids = registry.get("projects") if isinstance(registry, dict) else None
    others = {v for k, v in ids.items() if k != project} if isinstance(ids, dict) else set()
    if (owner is not None and owner.strip() != project.encode()) or project_id in others:
        raise ValueError(f"~/{base}/{project_id} belongs to another project")
    if owner is None:
        if host_entry_exists(root, parts):
            raise ValueError(f"~/{base}/{project_id} exists and names no project; it is "
                             "not taken for this one")
        write_place((root, parts, PROJECT_ROOT), project.encode())
    return project_id


def host_entry_exists(root, parts):
    """Whether root/parts... exists (anything, a link too), looked up without following
    a link below root."""
    fd = open_dir_beneath(root, parts[:-1])
    if fd is None:
        return os.path.lexists(os.path.join(root, *parts[:-1]))
    try:
        os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def project_lines(data, project):
    """The lines of a shared JSONL file (~/.claude/history.jsonl) that belong to `project`
    (their "project" names it); the others are other projects' and stay outside.  Only
    lines holding the project as JSON writes it are parsed (JSON_PLAIN: thousands of lines
    of other projects are not)."""
    needle = f'"{project}"'.encode() if set(project) <= JSON_PLAIN else b""
    lines = [line for line in (data or b"").splitlines(keepends=True) if needle in line]
    return b"".join(line for line in lines if line.endswith(b"\n") and
                    isinstance(record := parse_json(line), dict) and
                    record.get("project") == project)


def seed_state(items, home, private, project=None):
    """Copy the host's State items that are seeded into the session's home `private`.
    Returns what each item that flows back started from: the bytes of a file (None when
    the host had none), or the transcript_sizes of a "lines" directory."""
    seeded = {}
    for item in items:
        dest = os.path.join(private, item.path)
        if item.seed == "mine":
            lines = project_lines(read_place(host_place(home, item.path)), project)
            os.makedirs(os.path.dirname(dest), 0o700, exist_ok=True)
            if lines:           # none: the CLI makes the file when it writes one
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(lines)
        elif item.seed:
            root, parts, name = host_place(home, item.path)
            fd = open_dir_beneath(root, parts)
            if fd is not None:
                try:
                    os.makedirs(os.path.dirname(dest), 0o700, exist_ok=True)
                    copy_entry(fd, name, dest, [STATE_COPY_ENTRIES])
                finally:
                    os.close(fd)
        if item.back == "lines":
            seeded[item.path] = transcript_sizes(dest)
        elif item.back:
            seeded[item.path] = read_place(private_place(private, item.path))
    return seeded


def key_segments(key, project=None):
    """A guarded key ("a.b.c", or ("a.b.c", allowed values)) as (segments, values or None);
    PROJECT_KEY becomes the project's path, which may hold dots (and, escaped, fnmatch's
    special characters: it names that one project)."""
    text, values = (key, None) if isinstance(key, str) else key
    project = None if project is None else glob.escape(project)
    return [project if part == PROJECT_KEY else part for part in text.split(".")], values


_MISSING = object()


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
    """JSON written by the sandbox, or None when it is not strict JSON (or too deep to
    parse).  Python reads NaN, Infinity and 1e999 and would write them back, and the CLIs'
    own parsers then take the whole file for corrupt (Claude replaces it with defaults).
    Only UTF-8 without a byte order mark, as the CLIs read it (json.loads also takes UTF-16
    and a mark)."""
    try:
        text = data.decode("utf-8", "surrogatepass") if isinstance(data, bytes) else data
        if text.startswith("\ufeff"):    # a byte order mark: the CLIs' JSON.parse refuses it
            return None
        start = len(text) - len(text.lstrip(JSON_SPACE))
        try:
            value, end = json_scanner()(text, start)
        except SystemError:     # how the scanner fails before json.decoder, which names its
            value, end = json.loads(text, parse_constant=not_json,     # errors, is imported
                                    parse_float=finite_float), len(text)
        return None if text[end:].strip(JSON_SPACE) else value
    except (StopIteration, ValueError, RecursionError):
        return None


# json's own C scanner, as json.loads uses it, without importing json (which imports re:
# ~6 ms of a start that reads the shared history).  JsonRules is what it reads of its
# decoder; json.loads stands in where there is no C scanner.
JSON_SPACE = " \t\n\r"


class JsonRules:
    strict = True
    object_hook = object_pairs_hook = None
    parse_int = int


def json_scanner():
    if not hasattr(JsonRules, "scan"):
        JsonRules.parse_float, JsonRules.parse_constant = finite_float, not_json
        try:
            from _json import make_scanner
            JsonRules.scan = make_scanner(JsonRules)
        except ImportError:
            JsonRules.scan = json.scanner.make_scanner(json.JSONDecoder(
                parse_constant=not_json, parse_float=finite_float))
    return JsonRules.scan


def not_json(word):
    raise ValueError(f"{word} is not JSON")


def finite_float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return value


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
        return (json.dumps(result, indent=2, allow_nan=False) + "\n").encode()
    except (ValueError, RecursionError):
        return None


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
    return (json.dumps(merge_json(*parsed), indent=2, allow_nan=False) + "\n").encode()


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


def plain(value):
    """A credential's value: a string, number, boolean or null, or a list of strings."""
    if isinstance(value, list):
        return all(isinstance(v, str) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def keys_update(base, ours, keys, project, only_plain=False):
    """What a "keys" (or, with only_plain, "secret") item sends back: `base` with only
    the changes `ours` made to `keys`, or None.  A secret whose changed values are not all
    plain is refused whole (ValueError).  Unchanged bytes are no change (and not parsed)."""
    if ours == base:
        return None
    changed = guarded_changes(base, ours, keys, project)
    if changed is None or not only_plain:
        return changed
    tree = json.loads(changed)
    for key in keys:
        segments, _ = key_segments(key, project)
        for path in key_paths((tree,), segments):
            value = dotted(tree, path)
            if value is not _MISSING and not plain(value):
                raise ValueError(f"{'.'.join(path)} is not a plain value")
    return changed


def complete_lines(data):
    """The complete lines of a JSONL file written by the sandbox, if every one is a JSON
    object (a partial last line, still being written, is left out); else None.  Lines end
    at "\\n" only, as the CLIs read them (a "\\r" inside one is not an end); an empty line
    is left as it is, one of blanks is no JSON."""
    end = data.rfind(b"\n") + 1
    for line in data[:end].split(b"\n"):
        if line and not isinstance(parse_json(line), dict):
            return None
    return data[:end]


def lines_update(size, ours, theirs):
    """The new content of a host transcript, or None to leave it alone.  `size` is how much
    the session was seeded with (None: nothing), `ours` the session's file, `theirs` the
    host's file now (None when absent).  Only the complete lines appended to what the
    session was given go back, each a JSON object, after what the host has now; a
    transcript whose first `size` bytes are not the host's (rewritten in the session, or on
    the host meanwhile) is refused (ValueError), as is one whose lines would join a line
    the host left unfinished.  The lines given are compared as bytes, not parsed again."""
    start = size or 0
    if len(ours) < start or (theirs is not None and theirs[:start] != ours[:start]):
        raise ValueError("it was rewritten instead of appended to (in the session, or on "
                         "the host meanwhile)")
    cut = ours.rfind(b"\n", 0, start) + 1      # a line the session completed: checked whole
    lines = complete_lines(ours[cut:])
    if lines is None:
        raise ValueError("what the session added is not JSON lines")
    new = lines[start - cut:]
    if not new:
        return None
    grown = theirs is not None and len(theirs) > start
    if (grown and not theirs.endswith(b"\n")) or (cut < start and (theirs is None or grown)):
        # Its lines would be glued to a line the host left unfinished, or finish one the
        # host no longer has as the session was given it.
        raise ValueError("a line is unfinished on the host")
    return new if theirs is None else theirs + new


def write_place(place, data, mode=0o600):
    """Replace (or create) the host file at `place` with `data`: parents opened without
    following links (made 0700 when missing), a temporary file made with O_EXCL beside it,
    then rename().  The target must be a regular file of this user, or absent."""
    root, parts, name = place
    if len(data) > STATE_FILE_LIMIT:     # it could not be read back: it would be lost
        raise ValueError(f"it would grow past {STATE_FILE_LIMIT >> 20} MiB")
    fd = open_dir_beneath(root, parts, create=True)
    if fd is None:
        raise ValueError("a directory on its way is missing or a link")
    tmp = f".{name}.{os.getpid()}.bw-tmp"
    try:
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                raise ValueError("it is a symbolic link, which is never followed")
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise ValueError("it is not a regular file of yours")
            mode = info.st_mode & 0o777
        except FileNotFoundError:
            pass
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode,
                      dir_fd=fd)
        try:
            with os.fdopen(out, "wb") as f:
                f.write(data)
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=fd)
            raise
    finally:
        os.close(fd)


def back_keys(item, base, home, private, project, budget=None):
    """A "keys" or "secret" item: the allowed changes, merged under the CLI's lock
    (NAME.lock beside the file, as Claude's own) with what changed on the host meanwhile."""
    ours = read_place(private_place(private, item.path))
    if ours is None:
        return
    data = keys_update(base, ours, item.keys, project, only_plain=item.back == "secret")
    if data is None:
        return
    place = host_place(home, item.path)
    lock = os.path.join(place[0], *place[1], place[2] + ".lock")
    locked = take_lock(lock)
    try:
        merged = merge_state(base, data, host_read(place))
        if merged is not None:
            write_place(place, merged)
    finally:
        if locked:
            os.rmdir(lock)


def back_lines(item, bases, home, private, project, budget=None):
    """A "lines" item: each *.jsonl file directly in the directory, regular, within
    STATE_FILE_LIMIT, every complete line a JSON object, only appended to, what it adds
    within the session's `budget` (spend)."""
    fd = open_dir_beneath(private, item.path.split("/"))
    if fd is None:
        return
    try:
        names = sorted(n for n in os.listdir(fd) if is_transcript_name(n))
        ours = {n: read_at(fd, n) for n in names if not unchanged_size(fd, n, bases)}
    finally:
        os.close(fd)
    problems = []
    for name, data in ours.items():
        if data is None:
            problems.append(f"{name}: not a regular file of at most "
                            f"{STATE_FILE_LIMIT >> 20} MiB")
            continue
        place = host_place(home, f"{item.path}/{name}")
        try:
            size = (bases or {}).get(name)
            theirs = host_read(place)
            update = lines_update(size, data, theirs)
            if update is not None:
                spend(budget, len(update) - len(theirs or b""))
                write_place(place, update)
        except ValueError as error:
            problems.append(f"{name}: {error}")
    if problems:
        raise ValueError("; ".join(problems))


def unchanged_size(dir_fd, name, sizes):
    """Whether the regular file `name` is as long as it was seeded (sizes): nothing was
    appended, so nothing can go back (and neither it nor the host's copy is read)."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == (sizes or {}).get(name)


def back_mine(item, base, home, private, project, budget=None):
    """A "mine" item (a JSONL file all projects share): the complete lines the session
    appended to what it was given, each a JSON object of this project, appended to the
    host's file under the CLI's lock (NAME.lock)."""
    ours = read_place(private_place(private, item.path))
    if ours is None:
        return
    base = base or b""
    new = complete_lines(ours[len(base):]) if ours.startswith(base) else None
    if new is None:
        raise ValueError("not lines appended to what the session was given")
    if project_lines(new, project) != new:
        raise ValueError("a line of another project, or not a JSON object")
    if not new:
        return
    spend(budget, len(new))
    place = host_place(home, item.path)
    lock = os.path.join(place[0], *place[1], place[2] + ".lock")
    locked = take_lock(lock)
    try:
        theirs = host_read(place) or b""
        if theirs and not theirs.endswith(b"\n"):
            theirs += b"\n"
        write_place(place, theirs + new)
    finally:
        if locked:
            os.rmdir(lock)


def back_id(item, base, home, private, project, budget=None):
    """An "id" item: one short line of letters, digits and "-", when it changed."""
    ours = read_place(private_place(private, item.path))
    if ours is None or ours == base:
        return
    if not is_installation_id(ours):
        raise ValueError("not an id")
    write_place(host_place(home, item.path), ours)


# State.back: the check that decides what of the session's copy goes back to the host.
FLOWS_BACK = {"keys": back_keys, "secret": back_keys, "lines": back_lines, "id": back_id,
              "mine": back_mine}


def flow_back(profile, items, seeded, home, private, project):
    """Send back, item by item, what its FLOWS_BACK check accepts.  Returns a line for
    each item refused (its host copy is left as it was)."""
    lines, budget = [], [SESSION_BACK_LIMIT]
    if any(PROJECT_ID in i.path for i in items):
        try:
            project_id = claim_project_id(profile, home, private, project)
        except (OSError, ValueError) as error:
            lines.append(f"chats not saved: {printable(str(error))}")
            project_id = None
        items = with_project_id(items, project_id)
    for item in items:
        if not item.back:
            continue
        try:
            FLOWS_BACK[item.back](item, seeded.get(item.path), home, private, project,
                                  budget=budget)
        except (OSError, ValueError, RecursionError) as error:
            why = error.strerror if isinstance(error, OSError) and error.strerror else error
            lines.append(f"~/{item.path} not saved: {printable(str(why))}")
    return lines


# ---------------------------------------------------------------------------------------------
# Network summary and --learn: what the proxy's log tells at the session's end
# ---------------------------------------------------------------------------------------------

SUMMARY_HOSTS = 10


def reason_text(word):
    """A log reason in a few words for people (the proxy's REASONS), or the word itself."""
    return rules_module().REASONS.get(word, (printable(word), False))[0]


def fixable(word, host):
    """Whether an allow rule for the refused destination cures `word`: for a private address
    only a rule naming that address does, which the story suggests only for an IP (for a
    name it is the user's call, --allow-private or that address's rule)."""
    rules = rules_module()
    return rules.REASONS.get(word, ("", False))[1] and (
        word != rules.PRIVATE_ADDRESS or is_ip(host))


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
        text = ", ".join(reason_text(r) for r in self.reasons)
        return text + (": allow only if you mean it" if is_private_ip(self.host) else "")

    @property
    def option(self):
        """The option that would let it through, or "" when none would: an IP rule for an
        address (a private one is flagged in `why`: allow it only if you mean it); a name
        that resolved to a private address is allowed only by --allow-private, which is
        the user's call and never suggested."""
        if any(fixable(r, self.host) for r in self.reasons):
            return allow_option(self.host, self.port)
        return fix_option(self)


def network_story(records):
    """(connections allowed, [Blocked], most first): what the session summary tells.
    A destination is counted once per host:port, whatever the reasons."""
    allowed, blocked, private = 0, {}, rules_module().PRIVATE_ADDRESS
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
        if reason == private and record.get("address"):
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


def fix_option(blocked):
    """The fix for a blocked name that an --allow-domain NAME:PORT would not cure: an IP rule
    for the private address it resolved to (or, for a private-use one, --allow-private), or
    a /raw rule."""
    if is_ip(blocked.host):
        return ""
    rules = rules_module()
    if rules.PRIVATE_ADDRESS in blocked.reasons and blocked.address:
        ip = rules.parse_ip_spelling(blocked.address.rpartition(":")[0].strip("[]"))
        also = " or --allow-private" if ip and rules.address_class(ip) == "private-use" else ""
        return f"--allow-domain {shlex.quote(blocked.address)} (only if you mean it){also}"
    if blocked.reasons and set(blocked.reasons) <= rules.RAW_CURES:
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
                ", ".join(reason_text(r) for r in self.reasons) + ")")


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
    listed, quiet, refused, rules = [], [], 0, rules_module()
    for entry in blocked:
        if entry.reasons == [rules.PROXY_AUTH]:
            refused += entry.count
        elif entry.reasons == [rules.NOT_IN_ALLOWLIST] and \
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
    import textwrap     # only a wrapped summary needs it
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


# ---------------------------------------------------------------------------------------------
# Git guard: host git must not run what a session put in a repository
# ---------------------------------------------------------------------------------------------

# Host git, run anywhere in the project (a shell prompt runs `git status`), obeys the
# repository it finds there: the nearest .git (a directory, or a file naming one), or a
# directory that is itself a git directory; and `git status` enters the directory of each
# gitlink (mode 160000) in the index that holds a .git, .gitmodules or not.  The protected
# paths cover the repositories that exist at start.  At the start of a session the
# wrapper notes every repository below the project and the --allow-rw directories
# (take_git_snapshot); at its end, or at the next start after a SIGKILL, it looks again
# without running git (check_git): what is new, replaced, or changed in a way that can
# make git run something, or write through to a file elsewhere, is set aside under a
# name git does not know, and the user is told how to undo it.  Nothing is parsed from
# a config: a git directory without HEAD is no repository, and a gitlink whose
# directory has no .git runs nothing.


GIT_CHECK_ENTRIES = 200000              # each walk stops after this many entries,
GIT_CHECK_SECONDS = 5                   # or this long, and then says so loudly
GIT_DIR_ENTRIES = 20000                 # entries looked at inside one git directory
GIT_INDEX_MAX = 256 << 20
QUARANTINE_SUFFIX = ".bw-quarantine"

# What in a git directory a session may make or change without git running anything
# new: objects, refs, logs, the index and the state files of git commands.  .git/info
# only holds exclude and attributes, which name drivers that config must define.
# Everything else (config, config.worktree, commondir, gitdir, hooks, modules,
# worktrees, branches, remotes, sequencer...) that changed is set aside.
GIT_DATA = frozenset((
    "objects", "refs", "logs", "lfs", "info", "rr-cache", "index", "packed-refs", "HEAD",
    "ORIG_HEAD", "FETCH_HEAD", "MERGE_HEAD", "MERGE_MSG", "MERGE_MODE", "MERGE_RR",
    "CHERRY_PICK_HEAD", "REVERT_HEAD", "REBASE_HEAD", "AUTO_MERGE", "COMMIT_EDITMSG",
    "TAG_EDITMSG", "SQUASH_MSG", "description", "shallow", "gc.pid", "gc.log", "gitk.cache",
    "fsmonitor--daemon", "fsmonitor--daemon.ipc"))

GIT_DATA_PREFIXES = ("BISECT_", "sharedindex.")
GIT_DATA_SUFFIXES = (".lock",)

# Git's data is no configuration, but git writes it: reflogs and refs through a symlink
# (lockfiles follow one), COMMIT_EDITMSG, FETCH_HEAD, MERGE_MSG... with fopen("w"), and a
# reflog appended in place reaches every other name of a hard-linked file.  Git makes no
# symlink, fifo, socket or device there, and no hard link but between objects.
GIT_DATA_ENTRIES = 200000               # entries looked at in one git directory's data

GIT_UNREADABLE_NAMED = 5                # unreadable directories named in the warning

# In a directory that only looks like a git directory (a HEAD, objects and refs: they
# may be files of the project) only what the protection holds in a .git is looked at.
GIT_CODE = tuple(p[len(".git/"):].rstrip("/") for p in PROTECTED_PROJECT if p.startswith(".git/"))

# Files that configure nothing: empty, or a commondir placeholder.
GIT_INERT_CONTENTS = (b"", PLACEHOLDER_COMMONDIR)


def read_varint(data, pos):
    """Git's offset varint (the v4 index's path prefix length): (value, next position)."""
    byte = data[pos]
    value = byte & 0x7F
    while byte & 0x80:
        pos += 1
        byte = data[pos]
        value = ((value + 1) << 7) | (byte & 0x7F)
    return value, pos + 1


def index_hash_size(data):
    """The hash size of an index (20: SHA-1, 32: SHA-256) told by its trailing checksum;
    None when neither matches (index.skipHash writes zeros)."""
    for size, name in ((20, "sha1"), (32, "sha256")):
        if len(data) > 12 + size and hash_of(name, data[:-size]) == data[-size:]:
            return size
    return None


def parse_index_entries(data, size):
    """(entries as [(path bytes, mode, flags, extended flags)], shared index hex or None)
    of a version 2, 3 or 4 index whose hashes are `size` bytes; ValueError when it does
    not parse exactly."""
    if len(data) < 12 + size or data[:4] != b"DIRC":
        raise ValueError("not a git index")
    version, count = struct.unpack(">II", data[4:12])
    if version not in (2, 3, 4):
        raise ValueError(f"index version {version}")
    end, pos, entries, previous = len(data) - size, 12, [], b""
    fixed = 40 + size + 2
    for _ in range(count):
        if pos + fixed > end:
            raise ValueError("truncated entry")
        mode = struct.unpack(">I", data[pos + 24:pos + 28])[0]
        flags = struct.unpack(">H", data[pos + fixed - 2:pos + fixed])[0]
        name_at, extended = pos + fixed, 0
        if flags & 0x4000:
            if version < 3:
                raise ValueError("extended flags in a version 2 index")
            extended = struct.unpack(">H", data[name_at:name_at + 2])[0]
            name_at += 2
        if version == 4:
            strip, name_at = read_varint(data, name_at)
            if strip > len(previous):
                raise ValueError("bad path prefix")
            stop = data.index(b"\0", name_at, end)
            path = previous[:len(previous) - strip] + data[name_at:stop]
            pos = stop + 1
        else:
            stop = data.index(b"\0", name_at, end)
            path = data[name_at:stop]
            pos += (name_at - pos + len(path) + 8) & ~7
            if pos > end or data[stop:pos].strip(b"\0"):
                raise ValueError("bad entry padding")
        if (flags & 0xFFF) != min(len(path), 0xFFF):
            raise ValueError("bad path length")
        entries.append((path, mode, flags, extended))
        previous = path
    shared = None
    while pos < end:
        if pos + 8 > end:
            raise ValueError("truncated extension")
        signature, length = data[pos:pos + 4], struct.unpack(">I", data[pos + 4:pos + 8])[0]
        if pos + 8 + length > end:
            raise ValueError("truncated extension")
        if signature == b"link":
            shared = data[pos + 8:pos + 8 + size].hex()
        pos += 8 + length
    return entries, shared


def parse_index(data):
    """The entries and shared index of a git index file (see parse_index_entries), with
    SHA-1 or SHA-256 hashes; ValueError when it is no index this code reads."""
    size = index_hash_size(data)
    for candidate in ([size] if size else [20, 32]):
        try:
            return parse_index_entries(data, candidate)
        except (ValueError, IndexError, struct.error) as error:
            failure = error
    raise ValueError(str(failure))


def gitlinks(entries):
    """The paths (str) of the index entries that are gitlinks (mode 160000)."""
    return [os.fsdecode(path) for path, mode, _, _ in entries
            if mode & 0o170000 == 0o160000 and path]


def read_git_file(path, limit):
    """A regular file's first `limit` bytes, not following a symlink; None if it is not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read(limit)


def looks_like_git_dir(names):
    """Whether git takes a directory holding `names` for a git directory: HEAD, and
    objects and refs, or a commondir naming where they are."""
    return "HEAD" in names and ("commondir" in names or ("objects" in names and "refs" in names))


def git_kind(mode):
    return ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
            else "link" if stat.S_ISLNK(mode) else "other")


def list_dir(path):
    """{name: DirEntry} of a directory that is not a symlink; None when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.scandir(fd) as entries:
            return {entry.name: entry for entry in entries}
    except OSError:
        return None
    finally:
        os.close(fd)


def git_entry(path):
    """[kind, dev, ino, ctime_ns] of what is at `path` (not followed), or None."""
    st = stat_or_none(path, follow=False)
    return None if st is None else [git_kind(st.st_mode), st.st_dev, st.st_ino, st.st_ctime_ns]


def find_git_entries(roots, limit=None, seconds=None, clock=time.monotonic, unreadable=None):
    """What host git could take for a repository at or below `roots`, found without
    following a symlink: {path: [kind, dev, ino]} for each `.git` (kind dir, file, link
    or other) and each other directory that looks like a git directory (kind "gitdir"),
    and whether the walk saw everything: not cut short (GIT_CHECK_*), and no directory
    it could not read (git enters one it may not list: mode 311); those are added to the
    list `unreadable`.  A .git directory is not entered (git_members looks inside); any
    other is, whatever it looks like: a HEAD, objects and refs are files of the project
    as well.  Shallow directories first: where a walk cut short stops, the repositories
    the user works in have been seen."""
    found, cut, missed = walk_git_entries(roots, limit, seconds, clock)
    if unreadable is not None:
        unreadable.extend(missed)
    return found, not cut and not missed


def walk_git_entries(roots, limit=None, seconds=None, clock=time.monotonic):
    """find_git_entries: (found, whether the walk was cut short, [unreadable directories])."""
    limit = GIT_CHECK_ENTRIES if limit is None else limit
    deadline = clock() + (GIT_CHECK_SECONDS if seconds is None else seconds)
    found, seen, queue, unreadable = {}, 0, list(roots), []
    for path in queue:          # breadth first: the loop reads what it appends
        if seen > limit or clock() > deadline:
            return found, True, unreadable
        listing = list_dir(path)
        if listing is None:
            if (git_entry(path) or [None])[0] == "dir":     # gone: nothing to enter
                unreadable.append(path)
            continue
        seen += len(listing)
        if looks_like_git_dir(listing):
            entry = git_entry(path)
            if entry:
                found[path] = ["gitdir", *entry[1:3]]
        for name in sorted(listing):
            if name == ".git":
                entry = git_entry(os.path.join(path, name))
                if entry:
                    found[os.path.join(path, name)] = entry[:3]
            elif listing[name].is_dir(follow_symlinks=False):
                queue.append(os.path.join(path, name))
    return found, False, unreadable


def git_data(name):
    return (name in GIT_DATA or name.startswith(GIT_DATA_PREFIXES)
            or name.endswith(GIT_DATA_SUFFIXES))


def git_members(path, kind, limit=None):
    """What of a repository can make git run something, as {relative path: [ino,
    ctime_ns]} (ctime: nothing in the sandbox can set it back, so any change shows):
    for a git directory everything but GIT_DATA, and a git directory inside (a
    submodule's, a worktree's) is looked at the same way but for its own entry; for a
    directory found by its looks, GIT_CODE; for a .git file or symlink, itself ("");
    and in the GIT_DATA of each, what git would write through (git_data_hazards).
    None when there were more than GIT_DIR_ENTRIES, or the directory cannot be read."""
    if kind not in ("dir", "gitdir"):
        entry = git_entry(path)
        return {"": entry[2:4]} if entry else {}
    limit = GIT_DIR_ENTRIES if limit is None else limit
    members, stack = {}, [path]
    while stack:
        directory = stack.pop()
        listing = list_dir(directory)
        if listing is None and directory == path:
            return None
        listing = listing or {}
        is_git = looks_like_git_dir(listing)
        for name in listing:
            child = os.path.join(directory, name)
            if is_git and git_data(name):
                hazards = git_data_hazards(child)
                if hazards is None:
                    return None
                members.update((os.path.relpath(os.path.join(child, h), path), v)
                               for h, v in hazards.items())
                continue
            if kind == "gitdir" and directory == path and name not in GIT_CODE:
                continue
            entry = git_entry(child)
            if entry is None:
                continue
            if entry[0] == "dir":
                stack.append(child)
                if looks_like_git_dir(list_dir(child) or {}):
                    continue            # its own ctime changes with every commit in it
            members[os.path.relpath(child, path)] = entry[2:4]
            if len(members) > limit:
                return None
    return members


def git_store_entered(parts):
    """Whether the data walk enters the directory `parts` (relative to a git directory):
    not the fan-out directories of objects (objects/ab) and LFS objects (lfs/objects/ab/cd),
    where files are only made by link or rename, never written through (and are many)."""
    if parts[0] == "objects":
        return len(parts) < 2 or parts[1] in ("info", "pack")
    return parts[0] != "lfs" or len(parts) < 4 or parts[1] != "objects"


def git_data_hazards(path, limit=None):
    """In the GIT_DATA entry `path` of a git directory (a file, or a tree: logs, refs,
    info, rr-cache, objects but its fan-out), what host git would write through to
    somewhere else: {relative path ("" for `path`): [ino, ctime_ns]} of each symlink,
    fifo, socket or device, each file with another name (st_nlink > 1; objects and LFS
    objects excepted: a local clone links them, and they are never written in place),
    and each directory that cannot be listed (git may know the names in it).  None
    after GIT_DATA_ENTRIES entries."""
    limit = GIT_DATA_ENTRIES if limit is None else limit
    top = os.path.basename(path)
    store = top in ("objects", "lfs")
    hazards, seen, stack = {}, 0, [""]
    while stack:
        relative = stack.pop()
        full = os.path.join(path, relative) if relative else path
        try:
            st = os.lstat(full)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if not git_store_entered([top, *relative.split("/")] if relative else [top]):
                continue
            listing = list_dir(full)
            if listing is None:
                hazards[relative] = [st.st_ino, st.st_ctime_ns]
                continue
            seen += len(listing)
            if seen > limit:
                return None
            stack.extend(os.path.join(relative, name) if relative else name for name in listing)
        elif not stat.S_ISREG(st.st_mode) or (st.st_nlink > 1 and not store):
            hazards[relative] = [st.st_ino, st.st_ctime_ns]
    return hazards


def changed_members(before, after):
    """The members (see git_members) made or changed between `before` and `after`,
    shallowest first, none below another."""
    changed = []
    for relative in sorted(after):
        if before.get(relative) != after[relative] and not any(
                relative.startswith(c + "/") for c in changed if c):
            changed.append(relative)
    return changed


def inert(path):
    """Whether a file or directory configures nothing: empty (as the session's
    placeholders are), or a commondir placeholder.  A directory that cannot be listed
    may hold anything; a file with another name is written through to it."""
    try:
        st = os.lstat(path)
    except OSError:
        return True
    if stat.S_ISDIR(st.st_mode):
        return list_dir(path) == {}
    if not stat.S_ISREG(st.st_mode) or st.st_size > 16 or st.st_nlink > 1:
        return False
    return read_git_file(path, 16) in GIT_INERT_CONTENTS


def gitlink_paths(top, index):
    """Where the gitlinks of the index file `index` (of the work tree `top`) point, read
    without git: [path]; those of a split index's shared part too.  ValueError when the
    index does not parse."""
    data = read_git_file(index, GIT_INDEX_MAX)
    if data is None:
        return []
    entries, shared = parse_index(data)
    if shared:
        data = read_git_file(os.path.join(os.path.dirname(index), f"sharedindex.{shared}"),
                             GIT_INDEX_MAX)
        entries += parse_index(data)[0] if data is not None else []
    return [os.path.join(top, path) for path in dict.fromkeys(gitlinks(entries))
            if not path.startswith("/") and ".." not in path.split("/")]


def through_symlink(top, path):
    """Whether a symlink lies between `top` and `path` (included): git does not enter a
    gitlink there."""
    current = top
    for part in os.path.relpath(path, top).split("/"):
        current = os.path.join(current, part)
        entry = git_entry(current)
        if entry is None or entry[0] == "link":
            return entry is not None
    return False


def narrowed(snapshot, other):
    """`snapshot` as far as the live session `other`'s snapshot agrees: a repository
    counts as there at start only if every live session sharing the tree had it at its
    own start, and its members count as they were at the earliest start (what one
    session made or changed stays so for the others, even if set aside and put back)."""
    theirs = other.get("roots", [])
    if not any(is_within(a, b) or is_within(b, a) for a in snapshot["roots"] for b in theirs):
        return snapshot
    known, entries = other.get("entries", {}), {}
    for path, info in snapshot["entries"].items():
        if not any(is_within(path, r) for r in theirs):
            entries[path] = info
        elif known.get(path, [])[:3] == info[:3]:
            entries[path] = known[path]
    return {**snapshot, "entries": entries}


def git_verdicts(found, vouched, changes):
    """What to set aside, decided from the walk at the end (`found`, see
    find_git_entries), the snapshot of the start (`vouched`: {path: [kind, dev, ino,
    members]}) and the members made or changed since (`changes`: {path: [relative
    paths]}): [(path, why, [paths to rename, in order])]."""
    verdicts = []
    for path, (kind, dev, ino) in sorted(found.items()):
        was = vouched.get(path)
        if was is None or was[:3] != [kind, dev, ino]:
            why = "made during the session" if was is None else "replaced during the session"
            if kind == "dir":
                verdicts.append((path, f"a repository {why}", [os.path.join(path, "HEAD"), path]))
            elif kind == "gitdir":
                verdicts.append((path, f"a git directory {why}", [os.path.join(path, "HEAD")]))
            else:
                what = {"file": "a .git file (gitdir: pointer)", "link": "a .git symlink"}
                verdicts.append((path, f"{what.get(kind, 'a .git')} {why}", [path]))
        elif kind not in ("dir", "gitdir"):
            if changes.get(path):
                verdicts.append((path, "a .git file rewritten during the session", [path]))
        else:
            for member in (os.path.join(path, c) if c else path for c in changes.get(path, [])):
                verdicts.append((member, "changed during the session in a repository that "
                                 "was there", [member]))
    return verdicts


def rename_aside(path):
    """Rename `path` to a free `path.bw-quarantine[-RANDOM]`, reaching its directory
    without following a symlink (names planted to take them all cannot be guessed); the
    new path.  OSError when it cannot."""
    parent, name = os.path.split(path)
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        for part in parent.strip("/").split("/"):
            if part:
                next_fd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = next_fd
        for n in range(20):
            new = name + QUARANTINE_SUFFIX + (f"-{os.urandom(4).hex()}" if n else "")
            try:
                os.lstat(new, dir_fd=fd)
            except FileNotFoundError:
                os.rename(name, new, src_dir_fd=fd, dst_dir_fd=fd)
                return os.path.join(parent, new)
        raise OSError(f"no free name beside {path}")
    finally:
        os.close(fd)


def inspect_git(snapshot):
    """The look at the end of a session (no git run): (verdicts, problems: [text])."""
    vouched = snapshot["entries"]
    found, cut, unreadable = walk_git_entries(snapshot["roots"])
    problems = git_walk_problems(cut or snapshot.get("cut", not snapshot.get("complete")),
                                 unreadable)
    for path, info in list(found.items()):
        if info[0] != "dir" or vouched.get(path, [])[:3] != info:
            continue
        top = os.path.dirname(path)
        try:
            links = gitlink_paths(top, os.path.join(path, "index"))
        except ValueError as error:
            problems.append(f"{path}/index does not parse ({error}); its gitlinks are not "
                            "checked")
            links = []
        for link in links:      # what the walk did not reach, git status enters
            git = os.path.join(link, ".git")
            if git not in found and not through_symlink(top, link):
                entry = git_entry(git)
                if entry:
                    found[git] = entry[:3]
    changes = {}
    for path, info in found.items():
        was = vouched.get(path)
        if was is None or was[:3] != info:
            continue
        before, now = was[3], git_members(path, info[0])
        if before is None:
            problems.append(f"{path} could not be read whole at the start (more than "
                            f"{GIT_DIR_ENTRIES} entries, or no permission); it is not checked")
            continue
        if now is None:
            changes[path] = [""]     # unreadable now, readable before: set it all aside
            continue
        changes[path] = [c for c in changed_members(before, now)
                         if not c or not inert(os.path.join(path, c))]
    return git_verdicts(found, vouched, changes), problems


def git_walk_problems(cut, unreadable):
    """What the walk for repositories did not see, for the report: [text]."""
    problems = []
    if cut:
        problems.append(f"the search stopped after {GIT_CHECK_ENTRIES} entries or "
                        f"{GIT_CHECK_SECONDS} s; repositories beyond it are not checked")
    if unreadable:
        more = len(unreadable) - GIT_UNREADABLE_NAMED
        problems.append("the search could not read " +
                        ", ".join(unreadable[:GIT_UNREADABLE_NAMED]) +
                        (f" and {more} more directories" if more > 0 else "") +
                        "; repositories in them are not checked, and host git still enters "
                        "them")
    return problems


def git_session_bases(environ):
    """Every place sessions of this user, of either tool, keep their private directories."""
    bases = [private_base(environ), *(session_base(environ, p.tool) for p in PROFILES.values())]
    return [b for b in dict.fromkeys(bases)
            if os.path.isdir(b) and not os.path.islink(b)]


def live_git_snapshots(bases, own):
    """The snapshots of the other live sessions (of either tool) of this user."""
    for path, _, fd in session_dirs_in(bases, [p.tool for p in PROFILES.values()]):
        if fd is not None:
            os.close(fd)
        elif path != own:
            snapshot = read_git_snapshot(path)
            if snapshot:
                yield snapshot


def sweep_stale_git(bases):
    """check_git for the sessions killed with SIGKILL, of either tool, once each, before
    anything else looks at the project."""
    for path, tool, fd in session_dirs_in(bases, [p.tool for p in PROFILES.values()]):
        if fd is None:
            continue
        try:
            say_git_check(path, tool, killed=True)
            for name in (GIT_SNAPSHOT, GIT_SNAPSHOT_JSON):
                with suppress(OSError):
                    os.unlink(os.path.join(path, name))
        finally:
            os.close(fd)


def read_git_snapshot(private_dir):
    """The snapshot take_git_snapshot wrote: marshal data (json would cost ~6 ms of imports
    at every start and end), in the session's own directory, which the sandbox never sees;
    or the JSON one a session of an earlier version left when killed."""
    data = read_git_file(os.path.join(private_dir, GIT_SNAPSHOT), GIT_INDEX_MAX)
    legacy = None if data else read_git_file(os.path.join(private_dir, GIT_SNAPSHOT_JSON),
                                             GIT_INDEX_MAX)
    try:
        snapshot = marshal.loads(data) if data else json.loads(legacy) if legacy else None
    except (ValueError, EOFError, TypeError, RecursionError):
        return None
    return snapshot if isinstance(snapshot, dict) and "entries" in snapshot else None


def take_git_snapshot(roots, private_dir, bases=()):
    """Before bwrap: note the repositories below `roots` (the project, --allow-rw
    directories) in the session's private directory, where the end, or the next start
    after a SIGKILL, finds them; as far as the live sessions in `bases` agree (narrowed)."""
    if not roots:
        return
    found, cut, unreadable = walk_git_entries(roots)
    snapshot = {"roots": list(roots), "since": time.time_ns(),
                "complete": not cut and not unreadable, "cut": cut,
                "entries": {path: [*info, git_members(path, info[0])]
                            for path, info in found.items()}}
    for other in live_git_snapshots(bases, private_dir):
        snapshot = narrowed(snapshot, other)
    fd = os.open(os.path.join(private_dir, GIT_SNAPSHOT),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        marshal.dump(snapshot, f)


def format_git_report(tool, done, failed, problems, snapshot, killed=False):
    """The one block the user reads at exit: found, done, how to undo."""
    head = f"{tool}: git: "
    lines = []
    if done or failed:
        where = " ".join(snapshot["roots"])
        lines.append(("a session that was killed " if killed else "this session ") +
                     f"made or changed git metadata in {where} that host git would obey "
                     "(config, hooks, a repository of its own):")
        for path, why, renames in done:
            lines.append(f"  {path}: {why}; set aside: " +
                         ", ".join(f"{old} -> {new}" for old, new in renames))
        for path, why, error in failed:
            lines.append(f"  {path}: {why}; COULD NOT be set aside ({error}): do not run "
                         "git there before removing it")
        if done:
            lines.append("git no longer sees them. Look inside (config, hooks) before you "
                         "undo; to undo:")
            for _, _, renames in done:
                lines.append("  " + " && ".join(f"mv -T {shlex.quote(new)} {shlex.quote(old)}"
                                                 for old, new in reversed(renames)))
    roots = " ".join(shlex.quote(root) for root in snapshot["roots"]) if problems else ""
    for problem in problems:
        lines.append(f"WARNING: {problem}: before running git there, look at what the session "
                     f"made: find {roots} -name .git -newerct @{snapshot['since'] // 10**9 - 1}")
    return "\n".join(head + printable(line) for line in lines)


def say_git_check(private_dir, tool, killed=False):
    """check_git for SessionDirs and sweep_stale; a failure is said loudly, never raised."""
    try:
        report = check_git(private_dir, tool, killed)
    except Exception as error:      # noqa: BLE001 -- the clean-up must go on
        report = (f"{tool}: git: WARNING: the check of git metadata failed "
                  f"({printable(repr(error))}); before running git in the project, look for "
                  ".git directories and files the session made")
    if report:
        say(report)


def check_git(private_dir, tool, killed=False):
    """The end of a session (or the start after it was killed): set aside what it made
    host git obey; the report to print, or ""."""
    snapshot = read_git_snapshot(private_dir)
    if snapshot is None:
        return ""
    verdicts, problems = inspect_git(snapshot)
    done, failed = [], []
    for path, why, renames in verdicts:
        moved = []
        try:
            for old in renames:
                if os.path.lexists(old) or old == path:
                    moved.append((old, rename_aside(old)))
        except OSError as error:
            failed.append((path, why, printable(str(error))))
            continue
        if moved:
            done.append((path, why, moved))
    return format_git_report(tool, done, failed, problems, snapshot, killed)


# ---------------------------------------------------------------------------------------------
# Runtime: a session's directories, the proxy subprocess and the bwrap run, in the order the
# entry scripts spell them out: Wrapper (Entry point) around plan_session, SessionDirs,
# FilterProxy and run_sandbox.
# ---------------------------------------------------------------------------------------------

# Start-up timings: where the time before bwrap goes, said with --verbose just before bwrap
# starts, and where the time after it went (the end), said last.  A mark is a clock read;
# nothing is said without --verbose.
class StartupClock:
    """Phases of the start-up, each the time since the previous mark; the first counts from
    STARTED (this module's first line: the interpreter's own start is not seen here).
    ended() starts the phases of the end, from when bwrap exited."""

    def __init__(self, started):
        self.last = started
        self.phases = []
        self.ending = False

    def mark(self, phase):
        now = time.perf_counter()
        self.phases.append((phase, now - self.last))
        self.last = now

    def ended(self):
        self.last, self.phases, self.ending = time.perf_counter(), [], True

    def line(self, tool):
        parts = ", ".join(f"{phase} {seconds * 1000:.1f} ms" for phase, seconds in self.phases)
        total = sum(seconds for _, seconds in self.phases) * 1000
        if self.ending:
            return f"{tool}: end: {parts}; {total:.0f} ms in all after bwrap"
        return f"{tool}: start-up: {parts}; {total:.0f} ms in all, then bwrap"

CLOCK = StartupClock(STARTED)


# Programs are started with os.posix_spawn: subprocess costs ~10 ms of imports at every
# start (signal's enums, threading, selectors, locale and re).
class Child:
    """A program spawn() started: what the wrapper needs of subprocess.Popen."""

    def __init__(self, pid):
        self.pid, self.returncode = pid, None     # returncode < 0: the signal that ended it

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, seconds=None):
        """Its exit status; TimeoutError after `seconds` (None: no bound)."""
        if seconds is None and self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        deadline = None if seconds is None else time.monotonic() + seconds
        while self.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"process {self.pid} still runs after {seconds} s")
            exited(self.pid, left)
        return self.returncode

    def send_signal(self, sig):
        if self.returncode is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def exited(pid, seconds):
    """Wait up to `seconds` for `pid` to exit (to be reaped by the caller), through a pidfd
    (Linux 5.3), else a few milliseconds at a time."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        time.sleep(min(seconds, 0.002))
        return
    try:
        select.select([fd], [], [], seconds)
    finally:
        os.close(fd)


def spawn(argv, env, pass_fds=(), stdin=None, quiet=False, new_session=False):
    """Start argv[0] (an absolute path) as a Child with descriptors 0-2 (`stdin` as 0 when
    given; 1 and 2 on /dev/null when `quiet`) and `pass_fds`, no other: an inheritable
    descriptor the wrapper was started with is closed in the child (subprocess's
    close_fds).  Signals as subprocess leaves them, SIGPIPE and SIGXFSZ default, and SIGCHLD
    too (ignored, it would leave bwrap waiting for children the kernel reaped); none
    blocked (run_sandbox blocks some while it spawns)."""
    actions = [] if stdin is None else [(os.POSIX_SPAWN_DUP2, stdin, 0)]
    if quiet:
        actions += [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, 1, 2)]
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        open_fds = range(3, os.sysconf("SC_OPEN_MAX"))
    for fd in open_fds:
        if fd > 2 and fd not in pass_fds:
            with suppress(OSError):
                if os.get_inheritable(fd):
                    actions.append((os.POSIX_SPAWN_CLOSE, fd))
    for fd in pass_fds:
        os.set_inheritable(fd, True)
    try:
        return Child(os.posix_spawn(argv[0], argv, env, file_actions=actions,
                                    setsid=new_session, setsigmask=(),
                                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD)))
    finally:
        for fd in pass_fds:
            os.set_inheritable(fd, False)


def stop(process, sig=signal.SIGTERM):
    """Signal a Child and reap it, bounded; SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(STOP_SECONDS)
    except TimeoutError:
        process.kill()
        process.wait()


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


def session_dirs_in(bases, tools):
    """(path, tool, fd holding the lock or None when the session lives) for each private
    directory of this user's sessions of `tools` in `bases`; the caller closes fd."""
    for base in bases:
        for name in sorted(os.listdir(base)):
            tool = next((t for t in tools if name.startswith(t + ".")), None)
            if tool is None:
                continue
            path = os.path.join(base, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                if os.fstat(fd).st_uid != os.getuid():
                    os.close(fd)
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                yield path, tool, None
                continue
            yield path, tool, fd


def sweep_stale(base, tool):
    """Remove what sessions killed with SIGKILL left: their directories are no longer locked."""
    for path, _, fd in session_dirs_in([base], [tool]):
        if fd is not None:
            os.close(fd)
            remove_tree(path)


def sweep_sessions(environ, tool):
    """sweep_stale for both places sessions live."""
    sweep_stale_git(git_session_bases(environ))
    sweep_stale(private_base(environ), tool)
    base = checked_session_base(environ, tool, create=False)
    if base is not None:
        sweep_stale(base, tool)


class StateCopy:
    """The session's own copy of the CLI's state, in its home (see the "CLI state" section):
    load() seeds it from the host's, save() sends back what FLOWS_BACK accepts and returns a
    line for each refusal."""

    def __init__(self, plan, private):
        self.plan, self.private = plan, private
        self.items = plan.state     # State items, the CLI's project id filled in by load()
        self.seeded = {}            # State path: what was copied in (seed_state)
        self.read_only = []         # home-relative: the seeded "ro" copies, bound read-only

    def load(self):
        plan, private = self.plan, self.private
        bound = {src for option, src, _ in plan.mounts if option == "--bind"}
        for relative in plan.profile.state_dirs:
            os.makedirs(os.path.join(private, relative), 0o700, exist_ok=True)
            if os.path.join(plan.home, relative) in bound:    # --allow-config-writes
                os.makedirs(os.path.join(plan.home, relative), 0o700, exist_ok=True)
        project_id = host_project_id(plan.profile, self.items, plan.home, plan.project)
        if project_id is not None:
            self.items = with_project_id(self.items, project_id)
        self.seeded = seed_state([i for i in self.items if PROJECT_ID not in i.path],
                                 plan.home, private, plan.project)
        self.read_only = [i.path for i in self.items if i.seed == "ro"
                          and os.path.lexists(os.path.join(private, i.path))]

    def save(self):
        return flow_back(self.plan.profile, self.items, self.seeded, self.plan.home,
                         self.private, self.plan.project)


class SessionDirs:
    """A session's private directories (the home and caches on disk, the proxy socket's
    under the runtime directory), each locked while the session lives so that a later
    start sweeps them only after a SIGKILL.  prepare() fills them: the CLI's state, the git
    snapshot, the protected paths.  Leaving undoes all of it, on every path: placeholders
    released, git checked, state sent back (FLOWS_BACK), directories removed."""

    def __init__(self, plan):
        self.plan, self.environ, self.tool = plan, plan.environ, plan.profile.tool
        self.dir = self.socket_dir = self.protection = self.state = None

    def __enter__(self):
        self.dir, self.lock_fd = make_private_dir(session_dirs_base(self.environ, self.tool),
                                                  self.tool)
        try:
            os.mkdir(os.path.join(self.dir, SESSION_HOME), 0o700)
            os.mkdir(os.path.join(self.dir, SESSION_CACHE), 0o700)
            self.state = StateCopy(self.plan, os.path.join(self.dir, SESSION_HOME))
            if self.plan.filter:
                self.socket_dir, self.socket_lock = make_private_dir(
                    private_base(self.environ), self.tool)
        except BaseException:
            remove_tree(self.dir)
            os.close(self.lock_fd)
            raise
        CLOCK.mark("directories")
        return self

    def __exit__(self, *exc_info):
        ignore_signals()
        try:
            try:
                # First, and whatever happens next: a placeholder left behind would stay.
                if self.protection is not None:
                    self.protection.release()
                    CLOCK.mark("placeholders")
            finally:
                say_git_check(self.dir, self.tool)
                CLOCK.mark("git check")
            try:
                for line in self.state.save():
                    say(f"{self.tool}: {line}")
            except (OSError, ValueError, RecursionError) as error:
                say(f"{self.tool}: could not save {self.plan.profile.name}'s state: "
                    f"{printable(error)}")
            CLOCK.mark("state")
        finally:
            remove_tree(self.dir)
            os.close(self.lock_fd)
            if self.socket_dir:
                remove_tree(self.socket_dir)
                os.close(self.socket_lock)
            CLOCK.mark("directories")
        return False

    def prepare(self):
        """What the sandbox starts from: its copy of the CLI's state, the snapshot of git
        metadata checked at the end, the protected paths held (placeholders, descriptors)."""
        self.state.load()
        CLOCK.mark("state")
        take_git_snapshot(self.plan.git_roots, self.dir, git_session_bases(self.environ))
        CLOCK.mark("git snapshot")
        self.protection = Protection(self.plan, private_base(self.environ))
        self.protection.hold()
        CLOCK.mark("protection")

    def roots(self):
        """The writable roots the session protects something in, as (mounted, real) pairs."""
        return [(root, root) for root in dict.fromkeys(r for r, _, _ in
                                                        self.plan.beneath.values())]

    def mount_fds(self):
        return self.protection.fds if self.protection else {}

    def mounts(self):
        return self.protection.mounts() if self.protection else self.plan.mounts


# The proxy's interpreter is started early (Python's own start, ~10 ms, is spent while the
# wrapper plans), then waits, its parent's pid noted first, until its arguments come on stdin
# (FilterProxy.hand) before it imports anything: the rest of its start, ~40 ms of CPU, would
# compete with the sandbox's start on a machine of two CPUs.
# socks_filter.py (the argument after the code) imported, from its bytecode cache (a script is
# compiled at every start), its directory LAST on sys.path so that nothing next to it can
# stand in for a standard module; its arguments come on stdin (main_from_stdin).
PROXY_MAIN = ("import os, sys, select; parent = os.getppid(); select.select([0], [], []); "
              "sys.path.append(os.path.dirname(sys.argv.pop(1))); "
              "import socks_filter; sys.exit(socks_filter.main_from_stdin(parent))")

# A session that runs this long (from bwrap's start) gets its proxy started even before a
# connection waits for it: the CLIs connect later than that, and find it serving.
PROXY_HAND_SECONDS = 0.1

LISTEN_BACKLOG = 1024       # connections that wait for the proxy (as socks_filter's own)


def proxy_listener(path):
    """The proxy's unix socket, bound at `path` (mode 600) and listening, for the proxy to
    serve (FilterProxy hands it over): connections made before the proxy serves wait in
    its backlog.  _socket (socket's C module): socket.py's enums cost ~2 ms at a start."""
    import _socket
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    old_mask = os.umask(0o177)
    try:
        listener.bind(path)         # made 0600 by the umask (a chmod would follow a link)
        listener.listen(LISTEN_BACKLOG)
    except OSError as error:
        listener.close()
        raise Failure(f"cannot make the filtering proxy's socket {path}: "
                      f"{error.strerror or error}") from None
    finally:
        os.umask(old_mask)
    return listener


class ProxyInterpreter:
    """socks_filter.py's interpreter, waiting, before it imports anything, for its arguments
    (hand) on a unix socket (stdin) with the write end of its ready pipe already open
    (ready_number in the child).  stop() ends it by a signal; at the end of its stdin without
    them (the wrapper's end) it exits, never having listened.  In a session of its own: the
    terminal's Ctrl-C is for the CLI."""

    def __init__(self, env):
        import _socket
        read_fd, write_fd = os.pipe()
        mine, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            self.process = spawn([sys.executable, "-I", "-S", "-c", PROXY_MAIN, FILTER_SCRIPT],
                                 env, pass_fds=(write_fd,), stdin=theirs.fileno(), quiet=True,
                                 new_session=True)
        except BaseException:
            os.close(read_fd)
            mine.close()
            raise
        finally:
            os.close(write_fd)
            theirs.close()
        self.stdin = mine
        self.ready_fd, self.ready_number = read_fd, write_fd

    def hand(self, args, err_path, listener=None):
        """Its arguments (and the file for its stderr), after their count and each ended by
        a NUL (a proxy given fewer, cut short, refuses them), and the descriptor `listener`
        (its listening socket, which becomes its descriptor HANDED_LISTENER) with them; a
        proxy that died already is found by the wait for its ready line."""
        import _socket
        items = [os.fsencode(item) for item in [err_path, *args]]
        data = b"".join(item + b"\0" for item in [str(len(items)).encode(), *items])
        try:
            if listener is not None:
                rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("i", listener))]
                data = data[self.stdin.sendmsg([data], rights):]
            self.stdin.sendall(data)
        except OSError:             # it died (EPIPE, ECONNRESET): its ready line tells
            pass
        finally:
            self.stdin.close()

    def stop(self):
        stop(self.process)          # first: it would start its imports at the end of stdin
        self.stdin.close()
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None


class FilterProxy:
    """socks_filter.py as a subprocess, for a session with --filter-network (a session
    without it gets one that does nothing).  Entering binds the proxy's socket; hand() gives
    it, with the proxy's arguments, to its interpreter (a ProxyInterpreter: the one
    Wrapper.plan started before the plan, or a new one, in a session of its own: the
    terminal's Ctrl-C is for the CLI), which only then does the rest of its start.  The
    wrapper keeps no copy of the socket once handed, so a proxy that dies takes it along
    and the sandbox's connections are refused (never let through).  bwrap starts without
    waiting for the proxy (connections wait in the socket's backlog meanwhile); wait(bwrap)
    hands the socket over when a connection waits in it or PROXY_HAND_SECONDS after bwrap
    started (with --learn or --proxy-log at once), watches for the ready line, and a proxy
    that fails, or says nothing within PROXY_READY_SECONDS of the hand, ends the session
    with a Failure.  Leaving stops it on every path and reports: the network summary from
    its log, and the --learn file (unless the sandbox never got going)."""

    def __init__(self, plan, dirs):
        self.plan, self.dirs, self.tool = plan, dirs, plan.profile.tool
        self.ready_fd = self.interpreter = self.listener = self.args = None
        self.ready = False
        self.said, self.deadline = b"", None

    def __enter__(self):
        if not self.plan.filter:
            return self
        interpreter = self.plan.early_proxy or ProxyInterpreter(proxy_env(self.plan))
        self.args = build_proxy_args(self.plan, self.dirs.dir, interpreter.ready_number,
                                     socket_dir=self.dirs.socket_dir)
        if self.plan.verbose:
            say(shlex.join(self.args))
        try:
            self.listener = proxy_listener(self.args[self.args.index("--listen") + 1])
        except BaseException:
            interpreter.stop()
            raise
        self.interpreter = interpreter
        self.ready_fd, interpreter.ready_fd = interpreter.ready_fd, None
        if self.plan.learn or self.plan.proxy_log:
            self.hand()
        CLOCK.mark("proxy socket")
        return self

    def hand(self):
        """Give the interpreter its arguments and the socket, keeping no copy: it starts.
        Its deadline is set first: a signal from here on leaves a proxy that may have its
        socket, which leaving must treat as started (finish_start)."""
        self.deadline = time.monotonic() + PROXY_READY_SECONDS
        try:
            self.interpreter.hand(self.args[4:], self.path(PROXY_ERRORS), self.listener.fileno())
        finally:
            self.listener.close()
            self.listener = None

    def announce(self):
        """The lines said before the sandbox starts: the options that open the network."""
        if self.interpreter is None:
            return
        for line in network_warnings(self.plan):
            say(f"{self.tool}: {line}")
        if not self.plan.unshare_net:
            say(f"{self.tool}: --filter-network --share-net is advisory: programs that "
                "ignore HTTP(S)_PROXY reach the network directly")

    def wait(self, bwrap):
        """bwrap's exit status; meanwhile the socket is handed over (when a connection
        waits, or after PROXY_HAND_SECONDS) and the proxy's ready line awaited (bounded): a
        proxy that fails to start raises Failure (run_sandbox then stops bwrap)."""
        pidfd = None
        if self.ready_fd is not None:
            with suppress(AttributeError, OSError):
                pidfd = os.pidfd_open(bwrap.pid)
        hand_at = time.monotonic() + PROXY_HAND_SECONDS
        try:
            while self.ready_fd is not None and bwrap.poll() is None:
                held = self.listener is not None        # not handed yet: until hand_at
                left = (hand_at if held else self.deadline) - time.monotonic()
                if left <= 0 and not held:
                    raise Failure(self.not_started())
                watched = [self.ready_fd, *([pidfd] if pidfd is not None else []),
                           *([self.listener] if held else [])]
                readable = select.select(watched, [], [], max(0, left) if pidfd is not None
                                         else min(max(0, left), 0.002))[0]
                if held and (self.listener in readable or time.monotonic() >= hand_at):
                    self.hand()         # a connection waits, or the session has run on
                if self.ready_fd in readable:
                    self.read_ready()
        finally:
            if pidfd is not None:
                os.close(pidfd)
        return bwrap.wait()

    def read_ready(self):
        """Read what the proxy says on its ready pipe; at its ready line, it serves."""
        chunk = os.read(self.ready_fd, 4096)
        self.said += chunk
        if b"\n" in self.said or not chunk:
            os.close(self.ready_fd)
            self.ready_fd = None
            if not self.said.startswith(b"ready"):
                raise Failure(self.not_started())
            self.ready = True

    def not_started(self):
        """Why the proxy is not serving, as the session's error."""
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None
        status = self.interpreter.process.poll()
        why = last_line(self.path(PROXY_ERRORS)) or (
            f"it exited with status {status}" if status is not None else
            f"no ready line within {PROXY_READY_SECONDS} s")
        return f"the filtering proxy did not start: {why}; the sandbox had no network"

    def finish_start(self):
        """The session ended (the CLI exited, a signal, an error) before the wrapper read
        the proxy's ready line, and the proxy is stopped by now: what its pipe holds is all
        it ever said, and as it says ready before it serves anything, "nothing went out" is
        true by construction.  None when it said ready (its log tells the rest), else the
        line to say: why it did not start, or that nothing went out (it was never handed
        the socket, or stopped while starting: a short session does not wait for it)."""
        try:
            self.said += read_until(self.ready_fd, STOP_SECONDS)
        finally:
            os.close(self.ready_fd)
            self.ready_fd = None
        if self.said.startswith(b"ready"):
            self.ready = True
            return None
        if self.said or self.interpreter.process.returncode not in (0, -signal.SIGTERM):
            return f"{self.tool}: {self.not_started()}"
        return (f"{self.tool}: network: 0 allowed, 0 blocked (the session ended before the "
                "proxy served: nothing went out)")

    def await_ready(self):
        """Wait (bounded) for the proxy's ready line, as a --learn file or --proxy-log asks
        (they are written as in any session); the line to say if it does not come."""
        try:
            while self.ready_fd is not None:
                left = self.deadline - time.monotonic()
                if left <= 0 or not select.select([self.ready_fd], [], [], left)[0]:
                    raise Failure(self.not_started())
                self.read_ready()
        except Failure as failure:
            return f"{self.tool}: {failure}"
        return None

    def __exit__(self, kind, error, traceback):
        ignore_signals()
        late = None
        if self.ready_fd is not None and self.deadline is not None and (
                self.plan.learn or self.plan.proxy_log):
            late = self.await_ready()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.interpreter is not None:
            self.interpreter.stop()     # first: a stopped proxy serves no more (finish_start)
        if self.ready_fd is not None:
            late = self.finish_start()
        if late:
            say(late)
        if self.ready:
            say(self.summary())
            if self.plan.learn and (error is None or isinstance(error, Terminated)):
                say(self.write_learned())
        if self.interpreter is not None:
            CLOCK.mark("proxy stopped, summary")
        return False

    def path(self, name):
        return os.path.join(self.dirs.dir, name)

    def log_path(self):
        return self.plan.proxy_log or self.path(PROXY_LOG)

    def summary(self):
        try:
            with open_text(self.log_path()) as f:
                lines = f.readlines()
            # A log without a record (a session that used no network) is summed up without
            # summarize's imports (socks_filter's tables, json: ~5 ms on the way out).
            width = terminal_width(sys.stderr)
            text = (summarize(self.tool, lines, width, self.plan.profile.expected_blocked)
                    if any(map(str.strip, lines)) else format_story(self.tool, 0, [], width))
        except OSError:
            text = f"{self.tool}: network: no proxy log"
        status = self.interpreter.process.returncode
        if status not in (0, -signal.SIGTERM):
            text += f" (the proxy exited with status {status}: " \
                    f"{last_line(self.path(PROXY_ERRORS))})"
        return text

    def write_learned(self):
        """Write the --learn file (atomically: a partial one would be a wrong allow list)."""
        target = self.plan.learn
        try:
            problem = host_file_problem(target, self.dirs.roots())
            if problem:
                raise OSError(problem)
            with open_text(self.log_path()) as f:
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
                with suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as error:
            return f"{self.tool}: learn: could not write {target}: {error}"
        plural = "" if count == 1 else "s"
        return (f"{self.tool}: learn: wrote {count} destination{plural} to {target}; review it, "
                f"then use --filter-network --unshare-net --allow-file {shlex.quote(target)}")


def run_sandbox(plan, dirs, proxy):
    """Prepare the session's directories, run bwrap until the CLI exits (the proxy handed
    its socket and its start watched meanwhile: FilterProxy.wait): the CLI's exit status."""
    dirs.prepare()
    proxy.announce()
    read_fd, write_fd = os.pipe()
    seccomp_fd = filter_fd(plan.seccomp)
    mount_fds = dirs.mount_fds()
    etc_fds = open_etc_files(plan.etc_files)
    args = build_bwrap_args(plan, dirs.dir, write_fd, seccomp_fd, socket_dir=dirs.socket_dir,
                            mount_fds=mount_fds, read_only_state=dirs.state.read_only,
                            mounts=dirs.mounts(), etc_fds=etc_fds)
    if plan.verbose:
        say(format_env_command(plan.env, args))
        CLOCK.mark("bwrap arguments")
        say(CLOCK.line(plan.profile.tool))
    # bwrap dies on SIGINT and SIGQUIT (Ctrl-C, Ctrl-\) and takes the sandbox with it:
    # it must ignore them, and the CLI gets them back through env --default-signal.
    # Without that env, bwrap keeps the defaults so they at least end the session.
    # The wrapper ignores them from here on: its clean-up runs when bwrap ends.
    keyboard = (signal.SIGINT, signal.SIGQUIT)
    if plan.env_program:
        for sig in keyboard:
            signal.signal(sig, signal.SIG_IGN)
    bwrap = None
    # A signal now would unwind before bwrap's pid is kept, and leave its sandbox running:
    # it waits until then.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGHUP,
                                                     signal.SIGQUIT, signal.SIGINT))
    try:
        try:
            bwrap = spawn(args, plan.env, pass_fds=(write_fd, seccomp_fd, *mount_fds.values(),
                                                    *etc_fds.values()))
        finally:
            os.close(write_fd)
            os.close(seccomp_fd)
            for fd in etc_fds.values():
                os.close(fd)
            if dirs.protection:
                dirs.protection.close_fds()
            for sig in keyboard:
                signal.signal(sig, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)    # last: a held signal ends it
        code = proxy.wait(bwrap)
        CLOCK.ended()
        set_up = bwrap_ran(read_until(read_fd))
    finally:
        ignore_signals()
        try:
            stop_sandbox(bwrap, read_fd)
        finally:
            os.close(read_fd)
    if not set_up:
        raise Failure("bwrap could not set up the sandbox (its message is above); if it is "
                      "about permissions or the uid map, check that unprivileged user "
                      "namespaces are allowed (sysctl "
                      "kernel.unprivileged_userns_clone, and on Ubuntu 24.04 "
                      "kernel.apparmor_restrict_unprivileged_userns or an AppArmor profile "
                      "for bwrap)", code or 1)
    return 128 - code if code < 0 else code


def read_until(fd, seconds=None, until=None, child=None):
    """What comes on `fd`: all of it, to its end, or with `until` as soon as that is in it;
    for at most `seconds` (None: no bound), and while `child` (a Child) runs."""
    data = b""
    deadline = None if seconds is None else time.monotonic() + seconds
    while until is None or until not in data:
        left = None if deadline is None else deadline - time.monotonic()
        if (left is not None and left <= 0) or (child is not None and child.poll() is not None):
            break
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def stop_sandbox(bwrap, status_fd):
    """End a bwrap that still runs (an error or a signal cut the session short), leaving no
    sandbox behind: SIGKILL the sandbox's first process, whose pid bwrap writes on its
    status pipe right after making it (pid 1 of the sandbox's pid namespace: everything
    inside dies with it), then wait for bwrap, which exits once its child is gone.  A bwrap
    signalled instead could leave a child not yet tied to it by --die-with-parent, running
    on after the session's checks and clean-up."""
    if bwrap is None or bwrap.poll() is not None:
        return
    info = parse_json(read_until(status_fd, STOP_SECONDS, b"\n", bwrap).split(b"\n")[0])
    child = info.get("child-pid") if isinstance(info, dict) else None
    if isinstance(child, int) and child > 1 and parent_of(child) == bwrap.pid:
        with suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        with suppress(TimeoutError):
            bwrap.wait(STOP_SECONDS)
    stop(bwrap)


def parent_of(pid):
    """The parent's pid of process `pid` (from /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def ignore_signals():
    """Clean-up has begun: no signal may cut it short (a placeholder left would stay)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# Doctor: checks of this machine and the user's configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class Check:
    """One line of --doctor: what was looked at, "ok", "note" or "FAIL", and how to fix it."""
    name: str
    status: str
    text: str
    fix: str = ""


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


def node_check(search_path):
    """--doctor: whether the node inside makes fetch() go through the proxy."""
    node = find_program("node", search_path)
    if node is None:
        return Check("node fetch", "ok", "no node on PATH")
    code, output = run_briefly([node, "--version"], 10)
    version = node_version(output) if code == 0 else None
    if version is None:
        return Check("node fetch", "note", f"cannot tell the version of {node}")
    name = f"Node {output.strip()} ({node})"
    if not node_honours(version, NODE_FETCH_PROXY):
        return Check("node fetch", "note", f"{name}: its built-in fetch() ignores proxy "
                     "variables, so inside --unshare-net it fails (ECONNREFUSED, EAI_AGAIN); "
                     "npm, the CLIs, curl, git and pip use the proxy",
                     "Node 22.21 or 24 and later honour NODE_USE_ENV_PROXY=1, which the "
                     "sandbox sets")
    if not node_honours(version, NODE_HTTP_PROXY):
        return Check("node fetch", "note", f"{name}: fetch() uses the proxy "
                     "(NODE_USE_ENV_PROXY=1), http.request does not", "Node 24.5 and later")
    return Check("node fetch", "ok", f"{name}: fetch() and http.request use the proxy "
                 "(NODE_USE_ENV_PROXY=1)")


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
        with suppress(OSError):
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
        with suppress(OSError):
            with open("/proc/sys/" + name.replace(".", "/")) as f:
                values[name] = f.read().strip()
    return values


def userns_fix(sysctls):
    """How to get unprivileged user namespaces, from the kernel settings that forbid them."""
    if sysctls.get("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return ("AppArmor forbids unprivileged user namespaces (Ubuntu 23.10 and later): give "
                "bwrap a profile, as root: printf 'abi <abi/4.0>,\\ninclude <tunables/global>\\nprofile "
                "bwrap /usr/bin/bwrap flags=(unconfined) {\\n  userns,\\n}\\n' > "
                "/etc/apparmor.d/bwrap && apparmor_parser -r /etc/apparmor.d/bwrap  (or, "
                "for every program: sysctl kernel.apparmor_restrict_unprivileged_userns=0)")
    if sysctls.get("kernel.unprivileged_userns_clone") == "0":
        return "as root: sysctl kernel.unprivileged_userns_clone=1"
    if sysctls.get("user.max_user_namespaces") == "0":
        return "as root: sysctl user.max_user_namespaces=15000"
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
    return Check("TIOCSTI", "note", text, "for every program, as root: sysctl dev.tty.legacy_tiocsti=0"
                 if value == "1" else "")


def allow_list_checks(profile, opts, environ):
    checks, files = [], []
    user_file = config_path(environ, profile.tool, "allowed-domains")
    files += [user_file] if os.path.isfile(user_file) else []
    for path in opts.allow_file:
        if os.path.exists(path) and not os.path.isdir(path):
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


@dataclass
class Look:
    """What --doctor's checks look at: this machine (Host), the profile and options in
    force, the environment, and the checks made so far (a later check may need an earlier
    one's result: the seccomp filter is tried only in a working sandbox)."""
    profile: Profile
    opts: object
    environ: dict
    host: Host
    skip: tuple = ()
    done: list = field(default_factory=list)

    def passed(self, name):
        return any(c.name == name and c.status == "ok" for c in self.done)


def check_bwrap(look):
    bwrap = look.host.bwrap
    if bwrap is None:
        return [Check("bwrap", "FAIL", "not found on PATH", install_hint("bwrap"))]
    version = first_line(run_briefly([bwrap, "--version"], 10)[1]) or "version unknown"
    checks = [Check("bwrap", "ok", f"{version} ({bwrap})")]
    if not look.host.disable_userns:
        checks.append(Check("nested userns", "note", "this bwrap lacks --disable-userns, so "
                            "the sandbox could make namespaces of its own",
                            "bubblewrap 0.8 or later"))
    return checks


def check_userns(look):
    if look.host.bwrap is None:
        return []
    code, output = run_briefly(trial_args(look.host.bwrap, look.host.disable_userns), 10,
                               env={"PATH": "/usr/bin:/bin"})
    if code == 0:
        return [Check("user namespaces", "ok",
                      "a trial sandbox ran (user, pid, ipc, uts and net namespaces)")]
    return [Check("user namespaces", "FAIL", "a trial sandbox failed: " +
                  last_words(output, code), userns_fix(read_sysctls(USERNS_SYSCTLS)))]


def check_seccomp(look):
    machine = os.uname().machine
    try:
        program = tiocsti_filter(machine)
    except Failure as error:
        return [Check("seccomp", "FAIL", str(error), "run on x86_64 or aarch64")]
    if not look.passed("user namespaces"):
        return [Check("seccomp", "FAIL", f"untested: no working bwrap ({machine} is supported)",
                      "fix bwrap first")]
    fd = filter_fd(program)
    try:
        code, output = run_briefly(trial_args(look.host.bwrap, look.host.disable_userns, fd), 10,
                                   env={"PATH": "/usr/bin:/bin"}, pass_fds=(fd,))
    finally:
        os.close(fd)
    if code == 0:
        return [Check("seccomp", "ok", f"the keystroke-injection filter loads ({machine})")]
    return [Check("seccomp", "FAIL", "bwrap refused the filter: " + last_words(output, code),
                  "a kernel with CONFIG_SECCOMP_FILTER")]


def check_tiocsti(look):
    return [tiocsti_check(read_sysctls(["dev.tty.legacy_tiocsti"]).get("dev.tty.legacy_tiocsti"))]


def check_socat(look):
    socat = look.host.socat
    if socat is None:
        return [Check("socat", "FAIL", f"not found on PATH ({TOOLS['socat'][0]} needs it)",
                      install_hint("socat"))]
    version = first_line(run_briefly([socat, "-V"], 10)[1], "socat version")
    return [Check("socat", "ok", f"{version or 'version unknown'} ({socat})")]


def check_own_files(look):
    return [Check("proxy", "FAIL", f"{path} is missing", keep_beside(path))
            for path in look.host.missing_files]


def check_cli(look):
    profile = look.profile
    cli = find_cli(profile, look.host.search_path, look.environ.get("HOME", ""), look.skip)
    if cli is None:
        return [Check(profile.name, "FAIL", f"not found (looked in {cli_places(profile)})",
                      profile.install_hint)]
    code, output = run_briefly([cli, "--version"], 20, env=dict(look.environ))
    if code == 0:
        return [Check(profile.name, "ok", f"{first_line(output)} ({cli})")]
    return [Check(profile.name, "FAIL", f"{cli} --version failed: {last_words(output, code)}",
                  f"reinstall it: {profile.install_hint}")]


def check_helpers(look):
    return [Check(helper, "FAIL", f"not found on PATH; {look.profile.name} needs it",
                  f"install {helper}")
            for helper in look.profile.helpers
            if find_program(helper, look.host.search_path) is None]


def check_ctrl_c(look):
    if look.host.env_program:
        return []
    return [Check("Ctrl-C", "note", "env(1) lacks --default-signal: Ctrl-C ends the whole "
                  "session instead of reaching the CLI", "coreutils 8.31 or later")]


def check_node(look):
    return [node_check(look.host.search_path)]


def check_allow_list(look):
    try:
        return allow_list_checks(look.profile, look.opts, look.environ)
    except Failure:
        return [Check("allow list", "FAIL", "cannot check rules without socks_filter.py",
                      keep_beside(FILTER_SCRIPT))]


def check_network(look):
    return network_checks(look.opts)


# --doctor's checks, in the order it prints them.
DOCTOR_CHECKS = (check_bwrap, check_userns, check_seccomp, check_tiocsti, check_socat,
                 check_own_files, check_cli, check_helpers, check_ctrl_c, check_node,
                 check_allow_list, check_network)


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
    if not early_flags(argv).no_defaults:
        try:
            defaults = read_defaults(profile, environ)
        except Failure as error:
            checks.append(Check("defaults", "FAIL", str(error), "correct or remove that line"))
        if defaults:
            checks.append(Check("defaults", "ok", shlex.join(defaults)))
    opts = parse_args(profile, ["--filter-network", *argv], defaults)
    look = Look(profile, opts, environ, probe_host(environ), skip, checks)
    for check in DOCTOR_CHECKS:
        checks += check(look)
    write_out(format_doctor(profile.tool, checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


# ---------------------------------------------------------------------------------------------
# Entry point: what the entry scripts call
# ---------------------------------------------------------------------------------------------

def plan_session(profile, argv, environ=None, skip=()):
    """Options (the defaults file's first), a look at the host, and the session's Plan.
    The options that act once (--list-presets, --dry-run, --doctor) raise Finished."""
    environ = dict(os.environ if environ is None else environ)
    early = early_flags(argv)
    if not (early.help or early.list_presets):
        environ["HOME"] = checked_home(environ)
    if early.doctor:
        raise Finished(doctor(profile, argv, environ, skip))
    # --help works even when the defaults file does not parse.
    defaults = [] if early.no_defaults or early.help else read_defaults(profile, environ)
    opts = parse_args(profile, argv, defaults)
    CLOCK.mark("options")
    if opts.list_presets:
        sys.stdout.write(format_presets())
        raise Finished(0)
    if not opts.dry_run:
        sweep_sessions(environ, profile.tool)
    host = probe_host(environ)
    plan = make_plan(profile, opts, environ, skip, host)
    plan.environ = environ
    CLOCK.mark("plan")
    tool = profile.tool
    if plan.verbose:
        if defaults:
            say(f"{tool}: defaults: {shlex.join(defaults)}")
        say(describe(plan))
        CLOCK.mark("what -v says")     # its own cost (shlex and re): a start without -v has none
    if plan.dry_run:
        private_dir = session_base(environ, tool) + "/" + tool + ".XXXXXXXX"
        socket_dir = os.path.join(private_base(environ), tool + ".XXXXXXXX")
        if plan.filter:
            write_out(shlex.join(build_proxy_args(plan, private_dir, "FD", socket_dir)))
        write_out(format_env_command(plan.env, build_bwrap_args(plan, private_dir, seccomp_fd="FD",
                                                                socket_dir=socket_dir)))
        raise Finished(0)
    check_tools(plan, host)
    return plan


class Wrapper:
    """The wrapper process around one session, entered first by an entry script: SIGTERM,
    SIGHUP and SIGQUIT unwind through every clean-up (Terminated), the terminal's modes are
    restored on every way out, an error is one line on stderr (never a traceback), and
    leaving exits the process with `status`, the CLI's exit status unless an error says
    otherwise (see the module docstring: Exit status).  With quick_exit (the entry scripts)
    the process ends with os._exit once all is cleaned up and flushed, skipping the
    interpreter's teardown (~5 ms; nothing is left to run then)."""

    def __init__(self, name, quick_exit=False):
        self.profile = PROFILES[name]
        self.status = 0
        self.undo = []          # what leaving undoes, the last first
        self.verbose = False
        self.quick_exit = quick_exit

    def __enter__(self):
        standard_streams_open()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # ignored, children would not be waited
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, raise_terminated)
        modes = terminal_modes(sys.stdin)
        if modes is not None:
            self.undo.append(lambda: restore_terminal(*modes))
        return self

    def plan(self, argv):
        """plan_session for this profile; the entry script itself is never the CLI.  With
        --filter-network on the command line the proxy's interpreter starts first, so that
        Python's own start overlaps the planning (see ProxyInterpreter)."""
        early = None
        if early_flags(argv).filter_network:
            early = ProxyInterpreter(dict(os.environ))
            self.undo.append(early.stop)
        plan = plan_session(self.profile, argv, skip=(os.path.realpath(sys.argv[0]),))
        self.verbose = plan.verbose
        if early and plan.filter and not plan.proxy_token:
            plan.early_proxy = early
        elif early:
            early.stop()
        return plan

    def __exit__(self, kind, error, traceback):
        undo_all(self.undo)
        if self.verbose and CLOCK.ending:
            say(CLOCK.line(self.profile.tool))
        if isinstance(error, SystemExit):       # argparse's --help
            return False
        if error is not None:
            self.status = exit_status(self.profile.tool, error)
        if self.quick_exit:
            os._exit(flushed(self.profile.tool, self.status))
        sys.exit(self.status)

TERMINAL_SIGNALS = (signal.SIGTTOU, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def terminal_modes(stream):
    """(fd, modes) of the terminal `stream` is, to restore on every way out (a CLI killed
    with the wrapper leaves it raw and without echo); None when it is no terminal."""
    try:
        fd = stream.fileno()
        return (fd, termios.tcgetattr(fd)) if os.isatty(fd) else None
    except (OSError, ValueError, AttributeError, termios.error):
        return None


def undo_all(steps):
    """Call each of `steps`, the last first, every one even when one raises."""
    if steps:
        try:
            steps[-1]()
        finally:
            undo_all(steps[:-1])


def restore_terminal(fd, saved):
    """tcsetattr, even from the background (SIGTTOU) or when the terminal is gone."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in TERMINAL_SIGNALS}
    try:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
    except (OSError, termios.error):
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_terminated(signum, frame):
    """The first of SIGTERM, SIGHUP, SIGQUIT ends the session; the others are ignored from
    here on, or a second one (a session scope's SIGTERM then SIGHUP) would cut short the
    clean-up the first began, before bwrap is stopped."""
    ignore_signals()
    raise Terminated(signum)


def flushed(tool, status):
    """`status` once stdout and stderr are flushed (os._exit would drop what is buffered);
    our own output that cannot be written (a full disk, a closed pipe) is an error."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except (OSError, ValueError) as error:
        say(f"{tool}: error: cannot write the output: {printable(error)}")
        status = status or 1
    with suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()
    return status


def standard_streams_open():
    """Descriptors 0, 1 and 2 open (on /dev/null when closed), so that no pipe the wrapper
    makes takes one of their numbers and then loses it to a child's redirection."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)      # the lowest free number: fd itself
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


def exit_status(tool, error):
    """The exit status for an exception that ended the wrapper, said in one line."""
    if isinstance(error, Finished):
        return error.code
    if isinstance(error, Failure):
        say(f"{tool}: error: {error}")
        return error.code
    if isinstance(error, Terminated):
        return 128 + error.signum
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, OSError):
        say(f"{tool}: error: {printable(error)}")
    else:   # the last resort: one line, never a traceback
        say(f"{tool}: error: unexpected {type(error).__name__}: {printable(error)}")
    return 1
CLOCK.mark("imports")
