"""The README says what the code does: one Python version, how to install the CLIs and
where they are looked for, root commands without sudo, the exit summary as printed."""

import ast
import glob
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

    def test_every_test_it_names_exists(self):
        """The security model cites tests by file, class and name: each must be there."""
        defined = set()
        for path in glob.glob(os.path.join(REPO, "tests", "*.py")):
            with open(path) as f:
                tree = ast.parse(f.read())
            defined |= {node.name for node in ast.walk(tree)
                        if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        for path in re.findall(r"`(tests/[\w.]+\.py)`", self.readme):
            self.assertTrue(os.path.isfile(os.path.join(REPO, path)), path)
        cited = re.findall(r"`(?:\w+\.)?(test_\w+|[A-Z]\w*Test|[A-Z]\w*(?:Flows|Lost|Projects)\w*)`",
                           self.readme)
        self.assertGreater(len(cited), 10)
        for name in cited:
            self.assertIn(name, defined, f"the README cites {name}, which no test defines")

    def test_reading_the_code_names_every_section(self):
        """"Reading the code" lists the modules' sections by their banners' first words."""
        part = self.readme.split("## Reading the code", 1)[1].split("\n## ", 1)[0]
        for module in ("bw_lib.py", "socks_filter.py"):
            with open(os.path.join(REPO, module)) as f:
                lines = f.read().split("\n")
            titles = [lines[i + 1][2:] for i, line in enumerate(lines[:-1])
                      if re.fullmatch(r"# -{20,}", line) and not re.fullmatch(r"# -{20,}", lines[i + 1])
                      and (i == 0 or not lines[i - 1].startswith("# "))]
            self.assertGreater(len(titles), 5, module)
            for title in titles:
                name = re.split(r"[:(,]", title)[0].strip()
                self.assertTrue(name in part, f"{module}: section {name!r} is not in Reading the code")


if __name__ == "__main__":
    unittest.main()
