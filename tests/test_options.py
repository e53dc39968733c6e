"""The options without argparse at start: fast_parse reads exactly what argparse's
parse_known_args reads (the same options, the same tokens for the CLI, in order) or declines,
and then argparse, built from the same table, decides; parsing a common command line imports
none of argparse's modules.  Pure, but for one fresh interpreter."""

import contextlib
import io
import random
import subprocess
import sys
import unittest
from unittest import mock

import bw_lib
from bw_lib import PROFILES, Failure
from tests.sandbox_harness import REPO

# Modules a common start must not import: checked after `import bw_lib` and the parse of a
# common command line.  re, shlex (without a defaults file) and the others bw_lib imports at
# module level today belong here once it no longer does.
NOT_IMPORTED_AT_START = ("argparse", "gettext", "textwrap", "difflib", "re", "shlex", "enum")

# Values and other tokens the generated command lines mix with the table's flags: whatever
# argparse reads in a way of its own (dash-led, empty, "=", "--", spaces, negative numbers).
VALUES = ("x", "-x", "--", "=", "", "a b", "-1", "-", "A=b", "8080", "1:2", "github", "~/x",
          "a=b=c", "-v", "--x y")
OTHERS = ("--foo", "--foo=bar", "--model", "opus", "-p", "hi", "-vv", "-vx", "-v=x", "-hv",
          "--verbos", "--filter", "--filter-netwrok", "word", "--resume", "-c", "--=x", "-=",
          "--dir x", "--allow-presets=npm", "--", "-h", "--help")


def outcome(read, *args):
    """What reading the options gave, comparable: the options and the tokens not ours, or
    the error's message and status, or --help's exit and text; None when fast_parse
    declined."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            result = read(*args)
    except Failure as error:
        return "failure", str(error), error.code
    except SystemExit as stop:
        return "exit", stop.code, out.getvalue()
    if result is None:
        return None
    if isinstance(result, tuple):
        return "parsed", vars(result[0]), result[1]
    return "parsed", vars(result) if isinstance(result, bw_lib.Options) else result


def command_lines(profile, seed, count):
    """`count` command lines from the profile's flags (as they are, and --flag=VALUE), VALUES
    and OTHERS, seeded: the same ones at every run."""
    rng = random.Random(seed)
    flags = sorted(bw_lib.option_flags(profile))
    for _ in range(count):
        tokens = []
        for _ in range(rng.randint(0, 8)):
            pick = rng.random()
            if pick < 0.45:
                tokens.append(rng.choice(flags))
            elif pick < 0.6:
                tokens.append(rng.choice(flags) + "=" + rng.choice(VALUES))
            elif pick < 0.85:
                tokens.append(rng.choice(VALUES))
            else:
                tokens.append(rng.choice(OTHERS))
        yield tokens


def argparse_only():
    """fast_parse declining everything: the argparse path alone, as before issue 15."""
    return mock.patch.object(bw_lib, "fast_parse", lambda flags, tokens: None)


class FastParseTest(unittest.TestCase):
    """fast_parse against the argparse parser built from the same table."""

    def assert_same_as_argparse(self, profile, parser, tokens):
        fast = outcome(bw_lib.fast_parse, bw_lib.option_flags(profile), tokens)
        if fast is not None:
            slow = outcome(parser.parse_known_args, list(tokens), bw_lib.Options())
            self.assertEqual(fast, slow, f"{profile.tool} {tokens}")
        return fast is not None

    def test_edge_cases(self):
        cases = (
            [], ["--dir", "x"], ["--dir=x"], ["--dir=x=y"], ["--dir", "a b"],
            ["--dir", "x", "--dir", "y"],
            ["-v"], ["--verbose", "--no-verbose"], ["-v", "--no-verbose", "-v"],
            ["--filter-network", "--no-filter-network", "--filter-network"],
            ["--no-network", "--unshare-net"], ["--share-net", "--no-network"],
            ["--allow-ro", "/a", "--allow-ro=/b", "--allow-rw", "/c"],
            ["--model", "opus", "-p", "hi", "--resume"], ["word", "--foo=bar", "-1", "-", ""],
            ["--foo bar", "--filter", "--verb", "--=x", "-=", "-p=x"],
            ["--skip-permissions", "--no-skip-permissions"],
            ["--learn", "out", "--proxy-log", "l"],
            ["--env", "A=b", "--pass-env", "A", "--host-port", "80:81", "--allow-preset", "npm"],
            # Declined: argparse decides.
            ["-h"], ["--help"], ["-vh"], ["-vv"], ["-vx"], ["-v=x"], ["-hv"], ["--help=x"],
            ["--dir"], ["--dir", "-x"], ["--dir", "--shell"], ["--dir", "-1"], ["--dir", "-"],
            ["--dir", ""], ["--dir="], ["--dir=-x"], ["--dir=--"], ["--dir", "-x y"],
            ["--shell=x"], ["--shell="], ["--no-network=1"], ["--verbose=yes"], ["--"],
            ["x", "--allow-domain"])
        for profile in PROFILES.values():
            parser = bw_lib.build_parser(profile)
            for tokens in cases:
                with self.subTest(tool=profile.tool, tokens=tokens):
                    self.assert_same_as_argparse(profile, parser, tokens)

    def test_generated_command_lines(self):
        for profile in PROFILES.values():
            parser, fast = bw_lib.build_parser(profile), 0
            for tokens in command_lines(profile, seed=15, count=1500):
                fast += self.assert_same_as_argparse(profile, parser, tokens)
            self.assertGreater(fast, 300, "fast_parse declined almost everything")

    def test_common_command_lines_are_read_without_argparse(self):
        for tokens in ([], ["--filter-network", "--allow-domain", "x.com", "--allow-preset=npm"],
                       ["--shell", "-v", "--dir", "/src/app", "--allow-ro", "/src/lib"],
                       ["--model", "opus", "-p", "fix the --filter bug", "--resume", "abc"],
                       ["--no-network", "--full-home-access", "--env", "A=b", "-c", "-1"]):
            with self.subTest(tokens=tokens):
                flags = bw_lib.option_flags(PROFILES["claude"])
                self.assertIsNotNone(bw_lib.fast_parse(flags, tokens))

    def test_what_it_declines(self):
        flags = bw_lib.option_flags(PROFILES["claude"])
        for tokens in (["-h"], ["--help"], ["-vv"], ["-vh"], ["--dir"], ["--dir", "-x"],
                       ["--dir="], ["--shell=x"], ["--"]):
            with self.subTest(tokens=tokens):
                self.assertIsNone(bw_lib.fast_parse(flags, tokens))


class ParseArgsTest(unittest.TestCase):
    """parse_args and parse_defaults give what they gave with argparse alone: the options,
    the CLI's arguments, or the same one-line error."""

    def test_command_lines_with_and_without_defaults(self):
        rng = random.Random(1515)
        for profile in PROFILES.values():
            for tokens in command_lines(profile, seed=16, count=300):
                if rng.random() < 0.5:
                    tokens.insert(0, "--filter-network")
                if rng.random() < 0.3:
                    tokens[rng.randint(0, len(tokens)):] = ["--", *rng.sample(OTHERS, 2)]
                defaults = rng.choice(([], [], ["--filter-network"], ["-v", "--allow-domain", "x"],
                                       ["--no-network"], ["--allow-ro=/a", "--dir", "d"]))
                with self.subTest(tool=profile.tool, tokens=tokens, defaults=defaults):
                    fast = outcome(bw_lib.parse_args, profile, list(tokens), defaults)
                    with argparse_only():
                        slow = outcome(bw_lib.parse_args, profile, list(tokens), defaults)
                    self.assertEqual(fast, slow)

    def test_defaults_file_lines(self):
        profile = PROFILES["claude"]
        for tokens in command_lines(profile, seed=17, count=300):
            text = " ".join(repr(token) for token in tokens) + "\n--verbose  # a comment\n"
            with self.subTest(text=text):
                fast = outcome(bw_lib.parse_defaults, profile, text, "options", "/home/u")
                with argparse_only():
                    slow = outcome(bw_lib.parse_defaults, profile, text, "options", "/home/u")
                self.assertEqual(fast, slow)

    def test_errors_stay_one_line(self):
        for argv in (["--dir"], ["--dir", "-x"], ["--shell=x"], ["-vx"], ["--filter"]):
            with self.subTest(argv=argv), self.assertRaises(Failure) as caught:
                bw_lib.parse_args(PROFILES["claude"], argv)
            self.assertEqual(caught.exception.code, 2)
            self.assertNotIn("\n", str(caught.exception))
            self.assertTrue(str(caught.exception).endswith("(see --help)")
                            or "did you mean" in str(caught.exception))


class TableTest(unittest.TestCase):
    """One table names the options: argparse's parser and the lists of options by role
    agree with it."""

    def test_argparse_knows_exactly_the_tables_flags(self):
        for profile in PROFILES.values():
            parser = bw_lib.build_parser(profile)
            self.assertEqual(sorted(parser._option_string_actions),
                             sorted(bw_lib.option_flags(profile)), profile.tool)

    def test_the_lists_by_role_name_options_of_the_table(self):
        flags = bw_lib.option_flags(PROFILES["claude"])
        for flag in bw_lib.ONE_SHOT:
            self.assertTrue(flag in flags or flag == "--", flag)
        for flag, dest in bw_lib.NEEDS_FILTER:
            self.assertEqual(flags[flag][1], dest, flag)


class StartImportsTest(unittest.TestCase):
    def test_a_common_command_line_imports_no_argparse(self):
        code = ("import sys\n"
                f"sys.path.insert(0, {REPO!r})\n"
                "import bw_lib\n"
                "bw_lib.parse_args(bw_lib.PROFILES['claude'], ['--shell', '--filter-network', "
                "'--allow-domain', 'x.com', '--', '-c', 'true'])\n"
                f"print(' '.join(m for m in {NOT_IMPORTED_AT_START!r} if m in sys.modules))\n")
        result = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split(), [], "imported at start")


if __name__ == "__main__":
    unittest.main()
