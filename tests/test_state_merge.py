"""The state merge, pure: JSON merged three ways, strict JSON only, files written in place
atomically and read without following links."""

import json
import os
import stat
import unittest

import bw_lib
from tests.sandbox_harness import temporary_root, write_file


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



if __name__ == "__main__":
    unittest.main()
