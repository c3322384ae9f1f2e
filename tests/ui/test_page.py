"""The debugging page in headless Chromium against a real uvicorn, network unreachable but loopback."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.api.conftest import png_bytes, scene
from tests.ui.conftest import API_KEY

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TIMEOUT = 60


def by_testid(driver, testid: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def all_by_testid(driver, testid: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def wait_idle(driver, timeout: float = TIMEOUT) -> None:
    """Until the page has loaded and every request, update and image it started has settled (the sample
    thumbnails load after the page does, and the Performance API counts each when it arrives)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && window.camserve !== undefined && "
        "window.camserve.pending === 0 && document.body.dataset.state !== 'loading' && "
        "Array.from(document.images).every((i) => !i.src || i.complete)"))


def open_page(driver, url: str) -> None:
    driver.get("about:blank")  # a fresh tab state: session storage (the key) goes with the origin's page
    driver.get(f"{url}/ui")
    wait_idle(driver)


def pick_sample(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f'[data-testid="sample-button"][data-label="{label}"]').click()
    wait_idle(driver)


def canvas_pixels(driver, testid: str = "overlay", index: int = 0) -> np.ndarray:
    """The RGB pixels a canvas shows, read in the page: ``(H, W, 3)`` uint8."""
    got = driver.execute_script("""
        const c = document.querySelectorAll(`[data-testid="${arguments[0]}"]`)[arguments[1]];
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
        return [c.width, c.height, Array.from(d.data)];""", testid, index)
    w, h, data = got
    return np.array(data, dtype=np.uint8).reshape(h, w, 4)[:, :, :3]


def request_counts(driver) -> tuple[int, int]:
    """Requests the page counted itself, and those the browser's Performance API saw."""
    return tuple(driver.execute_script(
        "return [window.camserve.requests, performance.getEntriesByType('resource').length]"))


def top_labels(driver) -> list[str]:
    return [p.text.split("\n")[0].strip() for p in all_by_testid(driver, "prediction")]


def run_curl(text: str, cwd: Path, env: dict[str, str] | None = None) -> list[dict]:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=cwd, capture_output=True, timeout=60,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr.decode()
    # One JSON document per request; curl prints them back to back.
    decoder, out, docs, i = json.JSONDecoder(), done.stdout.decode(), [], 0
    while i < len(out):
        doc, i = decoder.raw_decode(out, i)
        docs.append(doc)
    return docs


def screenshot(driver, path: Path) -> None:
    """The whole page, not just the window: the window grows to the page's height for the shot."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    inner = driver.execute_script("return window.innerHeight")
    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, full + height - inner)
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(width, height)


def select(driver, testid: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_testid(driver, testid)).select_by_value(value)
    wait_idle(driver)


def test_sample_prediction_and_overlay(browser, ui_server, shots):
    open_page(browser, ui_server)
    assert [o.text for o in browser.find_elements("css selector", '[data-testid="model-select"] option')] == ["shapes"]
    assert len(all_by_testid(browser, "sample-button")) == 5
    pick_sample(browser, "ring")
    assert top_labels(browser)[0] == "ring"
    assert len(top_labels(browser)) == 5
    assert not by_testid(browser, "error").is_displayed()

    overlay = canvas_pixels(browser)
    assert overlay.shape == (64, 64, 3)  # the heatmap at the upload's own size
    assert overlay.std() > 10  # not blank, not one flat colour
    # The overlay is the image tinted by the heatmap: close to neither the image nor a flat colormap.
    original = np.asarray(Image.open(io.BytesIO(httpx.get(f"{ui_server}/ui/samples/4.png").content)).convert("RGB"))
    assert np.abs(overlay.astype(int) - original).mean() > 10
    screenshot(browser, shots / "overlay.png")


def test_blend_matches_the_servers_overlay(browser, ui_server):
    """The page's own blending gives what the server's output=overlay gives, to rounding."""
    open_page(browser, ui_server)
    pick_sample(browser, "triangle")
    select(browser, "colormap-select", "viridis")
    browser.execute_script("""const s = document.querySelector('[data-testid="opacity"]');
        s.value = '0.7'; s.dispatchEvent(new Event('input'));""")
    page = canvas_pixels(browser)
    png = httpx.get(f"{ui_server}/ui/samples/2.png").content
    r = httpx.post(f"{ui_server}/explain", files={"image": ("t.png", png, "image/png")},
                   headers={"Accept": "image/png"},
                   data={"output": "overlay", "colormap": "viridis", "alpha": "0.7", "targets": "triangle"})
    server = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
    assert np.abs(page.astype(int) - server).max() <= 1


def test_method_change_changes_the_overlay(browser, ui_server, shots):
    open_page(browser, ui_server)
    pick_sample(browser, "cross")
    before = canvas_pixels(browser)
    n_requests, _ = request_counts(browser)
    select(browser, "method-select", "eigencam")
    after = canvas_pixels(browser)
    assert request_counts(browser)[0] == n_requests + 1
    assert np.abs(before.astype(int) - after).mean() > 1
    assert "eigencam" in by_testid(browser, "curl").text
    screenshot(browser, shots / "eigencam.png")


def test_opacity_changes_pixels_without_a_request(browser, ui_server):
    from selenium.webdriver.common.keys import Keys

    open_page(browser, ui_server)
    pick_sample(browser, "circle")
    before = canvas_pixels(browser)
    counts = request_counts(browser)
    slider = by_testid(browser, "opacity")
    for _ in range(20):  # by keyboard, as a person without a mouse would
        slider.send_keys(Keys.ARROW_RIGHT)
    assert float(slider.get_attribute("value")) == pytest.approx(0.7)
    after = canvas_pixels(browser)
    assert np.abs(before.astype(int) - after).mean() > 1
    select(browser, "colormap-select", "inferno")
    assert np.abs(canvas_pixels(browser).astype(int) - after).mean() > 1
    assert request_counts(browser) == counts


def test_curl_command_reproduces_the_page(browser, ui_server, tmp_curl_dir):
    open_page(browser, ui_server)
    pick_sample(browser, "square")
    text = by_testid(browser, "curl").text
    assert "/explain" in text and "X-API-Key" not in text
    [body] = run_curl(text, tmp_curl_dir)
    assert body["results"][0]["predictions"][0]["label"] == top_labels(browser)[0] == "square"
    assert body["results"][0]["explanations"][0]["method"] == by_testid(browser, "method-select").get_attribute(
        "value")


def test_uploaded_file_and_bad_file(browser, ui_server, tmp_path, shots):
    good = tmp_path / "my circle.png"
    good.write_bytes(png_bytes(scene("circle", seed=5)[0]))
    open_page(browser, ui_server)
    by_testid(browser, "file-input").send_keys(str(good))
    wait_idle(browser)
    assert top_labels(browser)[0] == "circle"
    assert "my circle.png" in by_testid(browser, "curl").text

    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image at all")
    expected = httpx.post(f"{ui_server}/predict", files={"image": ("notes.png", bad.read_bytes(), "image/png")})
    assert expected.status_code == 400
    by_testid(browser, "file-input").send_keys(str(bad))
    wait_idle(browser)
    error = by_testid(browser, "error")
    assert error.is_displayed()
    assert expected.json()["error"]["message"] in error.text
    assert "invalid_image" in error.text and "request id" in error.text
    assert top_labels(browser) == []
    screenshot(browser, shots / "error.png")


def test_compare_and_classes_views(browser, ui_server, shots):
    from selenium.webdriver.common.by import By

    open_page(browser, ui_server)
    pick_sample(browser, "ring")
    methods = httpx.get(f"{ui_server}/models").json()["models"][0]["methods"]

    browser.find_element(By.CSS_SELECTOR, '.tab[data-view="compare"]').click()
    wait_idle(browser)
    grid = by_testid(browser, "compare")
    captions = [c.text for c in grid.find_elements(By.TAG_NAME, "figcaption")]
    assert captions == methods
    maps = [canvas_pixels(browser, "grid-overlay", i) for i in range(len(methods))]
    assert all(m.std() > 10 for m in maps)
    assert len({m.tobytes() for m in maps}) > 1  # the methods do not all agree pixel for pixel
    assert by_testid(browser, "curl").text.count("/explain") == len(methods)
    screenshot(browser, shots / "compare.png")

    n_requests, _ = request_counts(browser)
    browser.find_element(By.CSS_SELECTOR, '.tab[data-view="classes"]').click()
    wait_idle(browser)
    assert request_counts(browser)[0] == n_requests + 1  # all top classes in one /explain
    captions = [c.text.split()[0] for c in by_testid(browser, "classes").find_elements(By.TAG_NAME, "figcaption")]
    assert captions == top_labels(browser)
    screenshot(browser, shots / "classes.png")

    # A click on another class explains that class.
    browser.find_element(By.CSS_SELECTOR, '.tab[data-view="single"]').click()
    wait_idle(browser)
    all_by_testid(browser, "prediction")[1].find_element(By.TAG_NAME, "button").click()
    wait_idle(browser)
    second = top_labels(browser)[1]
    assert f"targets={all_by_testid(browser, 'prediction')[1].get_attribute('data-index')}" in by_testid(
        browser, "curl").text
    assert browser.find_element(By.ID, "overlay-caption").text.startswith(second)


def test_phone_width_and_labels(browser, ui_server, shots):
    open_page(browser, ui_server)
    pick_sample(browser, "triangle")
    browser.set_window_size(390, 844)
    try:
        wait_idle(browser)
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
        screenshot(browser, shots / "phone.png")
    finally:
        browser.set_window_size(1280, 1000)
    # Every control has a label, or says what it is.
    unlabelled = browser.execute_script("""
        return [...document.querySelectorAll('input, select, button, canvas, pre')].filter(e =>
            !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()
        ).map(e => e.id || e.outerHTML.slice(0, 60));""")
    assert unlabelled == []


def test_api_keys(browser, keyed_server, tmp_curl_dir, shots):
    from selenium.webdriver.common.by import By

    open_page(browser, keyed_server)
    error = by_testid(browser, "error")
    assert error.is_displayed() and "401" in error.text and "unauthorized" in error.text
    key_input = by_testid(browser, "api-key")
    assert key_input.is_displayed()
    screenshot(browser, shots / "api-key.png")

    key_input.send_keys(API_KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    wait_idle(browser)
    assert not error.is_displayed()
    pick_sample(browser, "circle")
    assert top_labels(browser)[0] == "circle"
    text = by_testid(browser, "curl").text
    assert 'X-API-Key: $CAMSERVE_API_KEY' in text and API_KEY not in text
    [body] = run_curl(text, tmp_curl_dir, env={"CAMSERVE_API_KEY": API_KEY})
    assert body["results"][0]["predictions"][0]["label"] == "circle"
    # The key stays in this tab's session storage, not in any cookie or local storage.
    assert browser.execute_script("return sessionStorage.getItem('camserve-api-key')") == API_KEY
    assert browser.execute_script("return localStorage.length + document.cookie.length") == 0

    # Another model: its own classes and layers, the same image predicted and explained again.
    select(browser, "model-select", "tiny")
    assert sorted(top_labels(browser)) == ["a", "b", "c", "d"]
    layers = [o.get_attribute("value") for o in by_testid(browser, "layer-select").find_elements(By.TAG_NAME, "option")]
    tiny = httpx.get(f"{keyed_server}/models", headers={"X-API-Key": API_KEY}).json()["models"][1]
    assert layers == tiny["layers"]
    assert "'model=tiny'" in by_testid(browser, "curl").text
    assert canvas_pixels(browser).shape == (64, 64, 3)
    assert not error.is_displayed()


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_render_offline(browser, ui_server, shots, path):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{ui_server}{path}")
    WebDriverWait(browser, TIMEOUT).until(lambda d: "/explain" in d.find_element("tag name", "body").text)
    browser.save_screenshot(str(shots / f"{path.strip('/')}.png"))


_ADD_METRICS = """
    const real = window.fetch;
    window.fetch = async (...args) => {
        const response = await real(...args);
        if (!String(args[0]).endsWith('/explain') || !response.ok) return response;
        const body = await response.json();
        for (const e of body.results[0].explanations) {
            e.metrics = {confidence: {average_drop: 0.125, increase: false}, deletion: 0.0625, steps: 16};
        }
        return new Response(JSON.stringify(body), {status: response.status, headers: response.headers});
    };"""


def test_faithfulness_metrics_are_shown_when_present(browser, ui_server):
    open_page(browser, ui_server)
    pick_sample(browser, "circle")
    assert not by_testid(browser, "metrics").is_displayed()  # this server sends none: nothing shown
    browser.execute_script(_ADD_METRICS)  # as a server with the metrics of issue 12 would answer
    select(browser, "method-select", "layercam")
    shown = by_testid(browser, "metrics").text.split("\n")
    assert shown == ["confidence.average_drop", "0.125", "confidence.increase", "no", "deletion", "0.063", "steps",
                     "16"]


def test_asking_for_metrics(browser, ui_server):
    """Ticking the box sends ``metrics``; a server without them refuses it with a readable message."""
    from selenium.webdriver.common.by import By

    open_page(browser, ui_server)
    pick_sample(browser, "square")
    browser.find_element(By.ID, "metrics-toggle").click()
    wait_idle(browser)
    assert "metrics=" in by_testid(browser, "curl").text
    error = by_testid(browser, "error")
    if error.is_displayed():
        assert "metrics" in error.text and "422" in error.text
    else:
        assert by_testid(browser, "metrics").is_displayed()


def test_the_network_block_is_real(browser):
    """Control: FastAPI's own CDN-based /docs page renders nothing in this browser."""
    import threading

    import uvicorn
    from fastapi import FastAPI
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.api.server import free_port

    app = FastAPI()

    @app.post("/explain")
    async def explain() -> dict[str, str]:
        return {}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        WebDriverWait(browser, 30).until(lambda _: server.started)
        browser.get(f"http://127.0.0.1:{port}/docs")
        wait_idle_load = WebDriverWait(browser, 30)
        wait_idle_load.until(lambda d: d.execute_script("return document.readyState") == "complete")
        assert "/explain" not in browser.find_element("tag name", "body").text
    finally:
        server.should_exit = True
        thread.join(timeout=10)
