"""Regenerate the configuration reference inside README.md from the config schema."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from nocollapse.config import reference_table

README = Path(__file__).resolve().parents[1] / "README.md"
PATTERN = re.compile(r"(<!-- config-reference:start -->\n).*?(<!-- config-reference:end -->)", re.S)


def render(text: str) -> str:
    return PATTERN.sub(lambda m: m.group(1) + reference_table() + "\n" + m.group(2), text)


if __name__ == "__main__":
    text = README.read_text()
    new = render(text)
    if "--check" in sys.argv:
        sys.exit(0 if new == text else 1)
    README.write_text(new)
