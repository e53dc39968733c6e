"""The state merge, pure: JSON merged three ways, strict JSON only, files written in place
atomically and read without following links."""

import json
import os
import random
import subprocess
import sys
import stat
import unittest

import bw_lib
from tests.sandbox_harness import REPO, temporary_root, write_file


class StateMergeTest(unittest.TestCase):
    def test_merge_json_keeps_both_sides(self):
        base = {"n": 1, "projects": {"/a": {"x": 1}}, "gone": 1, "theirs": 1}
        ours = {"n": 2, "projects": {"/a": {"x": 1}, "/b": {"y": 2}}, "theirs": 1}
        theirs = {"n": 1, "projects": {"/a": {"x": 5}}, "gone": 1, "theirs": 2, "new": 3}
        self.assertEqual(bw_lib.merge_json(base, ours, theirs), {
            "n": 2, "projects": {"/a": {"x": 5}, "/b": {"y": 2}}, "theirs": 2, "new": 3})

    def test_ours_wins_a_conflict(self):
        self.assertEqual(bw_lib.merge_json({"k": 1}, {"k": 2}, {"k": 3}), {"k": 2})

    def test_merge_state(self):
        self.assertIsNone(bw_lib.merge_state(b"{}", b"{}", b'{"a": 1}'))
        self.assertIsNone(bw_lib.merge_state(b"{}", None, b"{}"))
        self.assertEqual(bw_lib.merge_state(b"{}", b'{"a":1}', b"{}"), b'{"a":1}')
        self.assertEqual(bw_lib.merge_state(None, b'{"a":1}', None), b'{"a":1}')
        merged = bw_lib.merge_state(b'{"a": 1}', b'{"a": 2}', b'{"a": 1, "b": 3}')
        self.assertEqual(json.loads(merged), {"a": 2, "b": 3})
        self.assertEqual(bw_lib.merge_state(b"{}", b"broken", b'{"b": 1}'), b"broken")

    def test_write_place_is_atomic_and_keeps_the_mode(self):
        root = temporary_root(self, "bw-unit-")
        path = write_file(os.path.join(root, ".claude.json"), '{"a": 1}', 0o600)
        bw_lib.write_place((root, [], ".claude.json"), b'{"a": 2}\n')
        with open(path) as f:
            self.assertEqual(json.load(f), {"a": 2})
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(root)), [".claude.json"])

    def test_read_at_refuses_symlinks_fifos_and_directories(self):
        root = temporary_root(self, "bw-unit-")
        target = write_file(os.path.join(root, "target"), "secret")
        os.symlink(target, os.path.join(root, "link"))
        os.mkfifo(os.path.join(root, "fifo"))
        os.mkdir(os.path.join(root, "d.jsonl"))
        self.assertEqual(bw_lib.read_at(None, target), b"secret")
        for name in ("link", "fifo", "d.jsonl", "missing"):
            self.assertIsNone(bw_lib.read_at(None, os.path.join(root, name)), name)

    def test_state_json_must_be_strict(self):
        # Python reads NaN, Infinity and 1e999; Node does not, and Claude takes the file
        # for corrupt and replaces it: none of them may reach a host state file.
        for text in (b'{"theme": NaN}', b'{"numStartups": 1e999}', b'{"a": -Infinity}'):
            with self.subTest(text=text):
                self.assertIsNone(bw_lib.parse_json(text))
                self.assertIsNone(bw_lib.guarded_changes(b"{}", text, ("theme", "numStartups",
                                                                       "a")))
        self.assertEqual(bw_lib.parse_json(b'{"a": 1.5e3}'), {"a": 1500.0})



class ParseJsonTest(unittest.TestCase):
    """parse_json reads with json's C scanner without importing json: it must take and
    refuse exactly what json.loads with the strict rules takes and refuses in UTF-8."""

    def reference(self, data):
        """json.loads, strict, on UTF-8 only (no byte order mark, no UTF-16): what the
        CLIs' JSON.parse of a file read as UTF-8 takes."""
        try:
            text = data.decode("utf-8", "surrogatepass")
            if text.startswith("\ufeff"):
                return None
            return json.loads(text, parse_constant=bw_lib.not_json,
                              parse_float=bw_lib.finite_float)
        except (ValueError, RecursionError):
            return None

    def test_it_agrees_with_json_loads(self):
        rnd = random.Random(15)
        pieces = ['{', '}', '[', ']', '"', ':', ',', ' ', '\n', '\t', '1', '-0', '2.5e3',
                  '1e999', 'NaN', 'Infinity', 'true', 'null', '"a"', '"\\u00e9"', '"\\ud800"',
                  '\\', 'x', '\ufeff', '\x00', '"\x01"', '{"k": 1}', '[1, 2]', '\u00e9']
        cases = [b"", b" ", b"{}", b"[]", b"\xef\xbb\xbf{}", b"\xff{}", b'{"a":1} {}',
                 b"[" * 5000 + b"]" * 5000, '{"a": 1}'.encode("utf-16")]
        for _ in range(3000):
            text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 12)))
            cases.append(text.encode("utf-8", "surrogatepass"))
        for data in cases:
            self.assertEqual(bw_lib.parse_json(data), self.reference(data), data[:80])

    def test_it_fails_cleanly_before_json_is_imported(self):
        # The C scanner names its errors from json.decoder; before anything imported that, it
        # fails with SystemError, which parse_json must turn into the same answer.
        for data in (b'{"a": "abc', b'{"a": 1', b'[1,', b'{"a": "\\x"}', b'"\x01"',
                     b'{"a" 1}', b'{"a": NaN}', b'{"a": 1}'):
            code = ("import sys; sys.path.insert(0, sys.argv[1]); import bw_lib; "
                    "print(repr(bw_lib.parse_json(bytes.fromhex(sys.argv[2]))), "
                    "'json' in sys.modules)")
            result = subprocess.run([sys.executable, "-I", "-S", "-c", code, REPO, data.hex()],
                                    capture_output=True, text=True, timeout=60)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stdout.rsplit(" ", 1)[0], repr(self.reference(data)), data)

class LinesTest(unittest.TestCase):
    """What a session may send back of the JSONL files (history, transcripts), read the way
    the fast path reads them: history lines parsed only when they hold the project, the
    seeded part of a transcript compared as bytes, only appended lines parsed."""

    PROJECT = "/home/u/app"

    def line(self, **record):
        return (json.dumps(record) + "\n").encode()

    def test_only_this_projects_lines_however_the_path_appears_elsewhere(self):
        mine = self.line(display="x", project=self.PROJECT)
        other = self.line(display=f'cd "{self.PROJECT}"', project="/home/u/other")
        nested = self.line(display="y", meta={"project": self.PROJECT})
        escaped = b'{"project": "\\/home\\/u\\/app"}\n'      # the same path, "\/" escaped
        partial = json.dumps({"project": self.PROJECT}).encode()   # no newline yet
        data = mine + other + nested + escaped + b"not json " + self.PROJECT.encode() + b"\n"
        self.assertEqual(bw_lib.project_lines(data + partial, self.PROJECT), mine)
        self.assertEqual(json.loads(escaped)["project"], self.PROJECT)

    def test_a_project_json_would_escape_is_found_by_parsing_every_line(self):
        for project in ('/home/u/"quoted"', "/home/u/caf\u00e9", "/home/u/back\\slash"):
            mine = self.line(project=project)
            ascii_escaped = (json.dumps({"project": project}, ensure_ascii=True) + "\n").encode()
            other = self.line(project="/elsewhere")
            self.assertEqual(bw_lib.project_lines(other + mine + ascii_escaped, project),
                             mine + ascii_escaped)

    def test_transcripts_take_only_complete_appended_lines(self):
        seeded = b'{"n": 1}\n'
        ours = seeded + b'{"n": 2}\n{"n": 3'
        self.assertEqual(bw_lib.lines_update(len(seeded), ours, seeded), seeded + b'{"n": 2}\n')
        self.assertEqual(bw_lib.lines_update(len(seeded), ours, None), b'{"n": 2}\n')
        self.assertEqual(bw_lib.lines_update(None, b'{"a": 1}\n', None), b'{"a": 1}\n')
        self.assertIsNone(bw_lib.lines_update(len(seeded), seeded, seeded))
        later = seeded + b'{"host": 1}\n'      # the host appended meanwhile: ours go after
        self.assertEqual(bw_lib.lines_update(len(seeded), ours, later),
                         later + b'{"n": 2}\n')

    def test_transcripts_rewritten_or_not_json_are_refused(self):
        seeded = b'{"n": 1}\n'
        for ours, theirs in ((b'{"n": 9}\n{"n": 2}\n', seeded),     # rewritten, same length
                             (b'{"n"', seeded),                    # cut short
                             (seeded + b'{"n": 2}\n', b'{"x": 1}\n'),  # host rewrote it
                             (seeded + b'echo $(id)\n', seeded),   # not JSON
                             (seeded + b'[1]\n', seeded)):         # not an object
            with self.assertRaises(ValueError, msg=ours):
                bw_lib.lines_update(len(seeded), ours, theirs)

    def test_a_line_the_host_left_open_is_checked_whole(self):
        partial = b'{"type": "user", "message": "abc'
        with self.assertRaises(ValueError):
            bw_lib.lines_update(len(partial), partial + b'{}\n', partial)
        self.assertEqual(bw_lib.lines_update(len(partial), partial + b'"}\n', partial),
                         partial + b'"}\n')
        with self.assertRaises(ValueError):     # a line ends at "\n" only
            bw_lib.lines_update(0, b'{"a": 1}\r{"b": 2}\n', None)
        with self.assertRaises(ValueError):     # UTF-8 only, no byte order mark
            bw_lib.lines_update(0, b'\xef\xbb\xbf{"a": 1}\n', None)

    def test_lines_are_never_glued_to_a_line_the_host_left_unfinished(self):
        seeded, added = b'{"a": 1}\n', b'{"evil": 1}\n'
        with self.assertRaises(ValueError):     # the host's copy grew by a partial line
            bw_lib.lines_update(len(seeded), seeded + added, seeded + b'{"host": "par')
        partial = b'{"a": 1}\n{"b": "x'
        ours = partial + b'y"}\n{"c": 3}\n'
        for theirs in (None, partial + b'ZZ"}\n'):    # deleted, or finished on the host
            with self.assertRaises(ValueError):
                bw_lib.lines_update(len(partial), ours, theirs)
        for blank in (b"   \n", b"\x0b\x0c\n", b"\r\n"):
            with self.assertRaises(ValueError):     # a line of blanks is no JSON
                bw_lib.lines_update(len(seeded), seeded + blank, seeded)
        self.assertEqual(bw_lib.lines_update(len(seeded), seeded + b"\n" + added, seeded),
                         seeded + b"\n" + added)    # an empty line stays as it was

    def test_unchanged_state_is_no_change(self):
        data = b'{"numStartups": 3}'
        self.assertIsNone(bw_lib.keys_update(data, data, ("numStartups",), self.PROJECT))
        self.assertIsNotNone(bw_lib.keys_update(data, b'{"numStartups": 4}', ("numStartups",),
                                                self.PROJECT))


if __name__ == "__main__":
    unittest.main()
