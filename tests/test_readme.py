"""The README states what the code does: config reference, set-up and test commands."""

from __future__ import annotations

import re
from pathlib import Path

from nocollapse.config import reference_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_config_reference_is_current():
    block = re.search(r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", README, re.S)
    assert block, "README lost its config-reference markers"
    assert block.group(1) == reference_table(), "run: python tools/update_readme.py"


def test_ci_runs_the_readme_test_command():
    setup = re.search(r"# 2\. install and run the tests\n(.+)\n", README).group(1)
    test_command = setup.split("&&")[-1].strip().replace(".venv/bin/", "")
    assert test_command in (ROOT / ".ci" / "run").read_text()
