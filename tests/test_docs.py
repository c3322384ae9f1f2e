"""The documentation: README.md and the MkDocs site under docs/.

The site builds offline with ``mkdocs build --strict``, so a broken link or anchor, or a page left out
of the navigation, fails here (and in CI); the README stays a front page; no document reads like a
work log. The examples the documents hold are run by tests/api/test_e2e.py and test_triton_client.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_examples import DOCS, ROOT, documents

pytest.importorskip("mkdocs")
pytest.importorskip("material")

README_LIMIT = 15 * 1024
# Work-log phrasing that has no place in a user's document: issue numbers, dated narrative.
WORK_LOG = re.compile(r"\bissues?\s*#?\d+|\bthis session\b|\blast session\b|\btoday\b|\bearlier runs?\b"
                      r"|\bnewcomer\b", re.I)


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner, not a build problem
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(root / "mkdocs.yml"), "--site-dir", str(site)],
                          capture_output=True, text=True, timeout=120, env=env)


def warnings(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith(("WARNING", "ERROR"))]


def test_site_builds_strictly_without_a_warning(tmp_path):
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0 and not warnings(done), done.stdout + done.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()


@pytest.fixture
def copy(tmp_path):
    """The site's sources in a scratch folder, to break on purpose."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    return tmp_path


@pytest.mark.parametrize("breakage", ["link", "anchor", "page outside the navigation"])
def test_a_broken_site_fails_the_build(copy, breakage):
    page = copy / "docs" / "api.md"
    if breakage == "link":
        page.write_text(page.read_text() + "\nSee [nothing](no-such-page.md).\n")
    elif breakage == "anchor":
        page.write_text(page.read_text() + "\nSee [nothing](configuration.md#no-such-heading).\n")
    else:
        (copy / "docs" / "orphan.md").write_text("# Orphan\n")
    done = build(copy, copy / "site")
    assert done.returncode != 0 and warnings(done), done.stdout + done.stderr


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= README_LIMIT, f"README.md is {len(text.encode())} bytes, over {README_LIMIT}"
    assert "make run" in text and "make test" in text


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_document_reads_like_a_work_log(path):
    found = [(n, m.group(0)) for n, line in enumerate(path.read_text().splitlines(), 1)
             for m in WORK_LOG.finditer(line)]
    assert not found, f"{path.relative_to(ROOT)}: {found}"


def test_the_work_log_pattern_catches_what_it_should():
    for text in ("Issue 13: batching", "see issue #24", "measured this session", "earlier runs", "today's code"):
        assert WORK_LOG.search(text), text
    for text in ("the tab's session storage", "a 413 payload", "the first issue of a run"):
        assert not WORK_LOG.search(text), text
