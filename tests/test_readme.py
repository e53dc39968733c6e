"""The README says what the code does: one Python version, how to install the CLIs and
where they are looked for, root commands without sudo, the exit summary as printed."""

import os
import re
import unittest

import bw_lib
from bw_lib import PROFILES
from tests.sandbox_harness import REPO


class ReadmeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(os.path.join(REPO, "README.md")) as f:
            cls.readme = f.read()

    def says(self, text):
        self.assertTrue(text in self.readme, f"the README does not say {text!r}")

    def test_one_python_version(self):
        stated = set(re.findall(r"Python (3\.\d+)(?: or newer| or later)", self.readme))
        self.assertEqual(len(stated), 1, stated)
        self.assertIn(f"Python {stated.pop()} or later", bw_lib.__doc__.replace("\n", " "))

    def test_how_to_install_the_clis_and_where_they_are_looked_for(self):
        for profile in PROFILES.values():
            self.says(profile.install_hint)
            for place in profile.lookup:
                self.says(f"~/{place}")
        self.says("https://claude.ai/install.sh")

    def test_root_commands_without_sudo(self):
        self.assertFalse("sudo " in self.readme, "the README assumes sudo")
        self.says("as root")

    def test_the_exit_summary_is_described_as_the_code_prints_it(self):
        self.assertFalse("At exit one line on stderr" in self.readme)
        self.says("a small table")
        self.says("## Package managers inside")



if __name__ == "__main__":
    unittest.main()
