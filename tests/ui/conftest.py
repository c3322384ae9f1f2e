"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by Selenium, against real servers.

Selenium is pointed at ``/usr/bin/chromedriver`` so its Selenium Manager never tries to download a
driver or a browser (there is no internet here). Without Chromium the browser tests skip, saying why;
``make test`` installs it first where root and apt-get allow.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.api.server import free_port, start_server

CHROMIUM = Path(os.environ.get("CAMSERVE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CAMSERVE_CHROMEDRIVER", "/usr/bin/chromedriver"))
ROOT = Path(__file__).resolve().parents[2]
# Screenshots of each view land here (bench-results/ is ignored by git); one is copied to docs/images/ui-page.png.
SHOTS = ROOT / "bench-results" / "ui"
API_KEY = "ui-test-key"


def _missing() -> str | None:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return (f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver; "
                "`make test` does it where it runs as root)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -e '.[dev]')"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"browser tests skipped: {reason}")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


def _serve(env: dict[str, str], config: Path | None = None) -> Iterator[str]:
    port = free_port()
    # Generous: on a busy shared machine two models' start-up has taken over 90 s.
    proc = start_server(port, env=env, config=config, ready_timeout_s=300)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings())) as c:
        yield c


@pytest.fixture(scope="session")
def ui_server() -> Iterator[str]:
    """A real uvicorn serving the shapes model, no API keys."""
    yield from _serve({})


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory) -> Iterator[str]:
    """A real uvicorn that needs an API key, serving shapes and a second, tiny model."""
    folder = tmp_path_factory.mktemp("keyed")
    (folder / "labels.txt").write_text("a\nb\nc\nd\n")
    config = folder / "models.toml"
    config.write_text('[models.shapes]\nsource = "builtin:shapes"\n\n'
                      f'[models.tiny]\nsource = "python:tests.api.models:tiny"\nlabels = "{folder}/labels.txt"\n'
                      "[models.tiny.preprocess]\nresize = [32, 32]\n")
    yield from _serve({"SERVICE_API_KEYS": API_KEY}, config)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager must not reach out
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--force-device-scale-factor=1",
        # The network is unreachable except loopback: a page that needs a CDN renders blank, as air-gapped.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
        "--no-first-run",
        "--disable-background-networking",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


@pytest.fixture
def tmp_curl_dir(tmp_path: Path) -> Path:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    return tmp_path
