"""The examples the documents hold, for the tests that run them as written.

Every fenced ```bash block that starts with ``curl``, in README.md and in any page under docs/, is run
against a real server serving the built-in shapes model (tests/api/test_e2e.py). An example that needs
another setup (other models, a GPU, a cluster) belongs in a ```sh or ```console block, which is not run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@dataclass(frozen=True)
class Example:
    where: str  # the document's path from the repository root, and the example's number in it
    code: str


def documents() -> list[Path]:
    """README.md and every Markdown page of the documentation site."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def fenced(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def curl_examples() -> list[Example]:
    found = []
    for path in documents():
        blocks = [b for b in fenced(path, "bash") if b.lstrip().startswith("curl")]
        found += [Example(f"{path.relative_to(ROOT)}:{i + 1}", b) for i, b in enumerate(blocks)]
    return found
