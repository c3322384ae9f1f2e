"""The page on the built-in detector and segmenter and on an embedding model, in headless Chromium against a real
uvicorn: the list shows what the model found, a row explains it, and the overlay (and every map of the compare
view) draws the explained box or the region's outline; an embedding is compared with a reference image, its
similarity shown and explained both ways."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from service.models.multiscenes import make_multi_scenes
from tests.api.conftest import png_bytes
from tests.ui.conftest import _serve
from tests.ui.test_page import (
    all_by_testid,
    by_testid,
    canvas_pixels,
    open_page,
    pick_sample,
    run_curl,
    screenshot,
    wait_idle,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SCALE = 4


@pytest.fixture(scope="module")
def task_server(tmp_path_factory) -> Iterator[str]:
    config = tmp_path_factory.mktemp("tasks") / "models.toml"
    config.write_text('[models.shapes-detect]\nsource = "builtin:shapes-detect"\n\n'
                      '[models.shapes-seg]\nsource = "builtin:shapes-seg"\n\n'
                      # The shapes network's pooled features: a 64-number embedding.
                      '[models.shapes-embed]\nsource = "python:tests.api.models:shapes_embedder"\n'
                      'task = "embedding"\n'
                      '[models.shapes-embed.preprocess]\n'
                      'resize = [64, 64]\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n')
    yield from _serve({}, config)


def _upload(driver, tmp_path, model: str) -> np.ndarray:
    from selenium.webdriver.support.ui import Select

    s = make_multi_scenes(1, seed=4321, n_shapes=2, distinct_labels=True)[0]
    big = np.asarray(Image.fromarray(s.image).resize((64 * SCALE, 64 * SCALE), Image.Resampling.NEAREST))
    path = tmp_path / "scene.png"
    path.write_bytes(png_bytes(big))
    Select(by_testid(driver, "model-select")).select_by_value(model)
    wait_idle(driver)
    by_testid(driver, "file-input").send_keys(str(path))
    wait_idle(driver)
    assert not by_testid(driver, "error").is_displayed()
    return s.class_map


def _magenta(pixels: np.ndarray) -> np.ndarray:
    p = pixels.astype(int)
    return (p[..., 0] > 200) & (p[..., 1] < 60) & (p[..., 2] > 200)


def _assert_box_drawn(magenta: np.ndarray, box: list[float]) -> None:
    """The drawing is the box (and its label just above it), nowhere else."""
    assert magenta.sum() > 100
    x0, y0, x1, y1 = box
    ys, xs = np.nonzero(magenta)
    assert ((xs >= x0 - 3) & (xs <= x1 + 3) & (ys >= y0 - 20) & (ys <= y1 + 3)).mean() > 0.99
    assert magenta[int(y0) + 4 : int(y1) - 3, int(x0) + 4 : int(x1) - 3].sum() == 0


def _region_edge(class_map: np.ndarray, cls: int) -> np.ndarray:
    """The boundary pixels of class ``cls``'s region, at the upload's size."""
    truth = np.kron(class_map, np.ones((SCALE, SCALE), dtype=np.uint8)) == cls
    padded = np.pad(truth, 1)
    return truth & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def _assert_outline_drawn(magenta: np.ndarray, edge: np.ndarray) -> None:
    """The outline follows the region's boundary (the predicted mask, close to the truth)."""
    assert magenta.sum() > 20
    assert magenta[edge].mean() > 0.8 and magenta[~edge].mean() < 0.01


def _compare_view(driver) -> list[tuple[dict, np.ndarray]]:
    """Each method's map in the compare view: what it explains and the pixels drawn."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, '.tab[data-view="compare"]').click()
    wait_idle(driver)
    assert not by_testid(driver, "error").is_displayed()
    canvases = all_by_testid(driver, "grid-overlay")
    return [(json.loads(c.get_attribute("data-target")), canvas_pixels(driver, "grid-overlay", i))
            for i, c in enumerate(canvases)]


def test_detections_listed_and_the_explained_box_drawn(browser, task_server, tmp_path):
    open_page(browser, task_server)
    _upload(browser, tmp_path, "shapes-detect")
    rows = all_by_testid(browser, "prediction")
    assert len(rows) >= 2
    second = rows[1]
    second.find_element("css selector", "button").click()
    wait_idle(browser)
    assert second.find_element("css selector", "button").get_attribute("aria-pressed") == "true"
    target = json.loads(by_testid(browser, "overlay").get_attribute("data-target"))
    assert target["detection"] == int(second.get_attribute("data-index"))
    _assert_box_drawn(_magenta(canvas_pixels(browser)), target["box"])


def test_segments_listed_and_the_region_outlined(browser, task_server, tmp_path):
    open_page(browser, task_server)
    class_map = _upload(browser, tmp_path, "shapes-seg")
    rows = all_by_testid(browser, "prediction")
    assert rows and "px" in rows[0].text
    cls = int(rows[0].get_attribute("data-index"))
    _assert_outline_drawn(_magenta(canvas_pixels(browser)), _region_edge(class_map, cls))


def test_a_click_on_a_box_explains_that_detection(browser, task_server, tmp_path):
    open_page(browser, task_server)
    _upload(browser, tmp_path, "shapes-detect")
    overlay = by_testid(browser, "overlay")
    assert json.loads(overlay.get_attribute("data-target"))["detection"] == 0  # the best one first
    assert len(all_by_testid(browser, "prediction")) >= 2
    target = json.loads(overlay.get_attribute("data-target"))
    # Click the middle of detection 1's box (the API's answer for the same upload).
    scene = (tmp_path / "scene.png").read_bytes()
    found = httpx.post(f"{task_server}/predict", data={"model": "shapes-detect"},
                       files={"image": ("scene.png", scene, "image/png")}).json()["results"][0]["detections"]
    x0, y0, x1, y1 = found[1]["box"]
    browser.execute_script("""
        const c = arguments[0], r = c.getBoundingClientRect();
        const x = r.left + arguments[1] * r.width / c.width, y = r.top + arguments[2] * r.height / c.height;
        c.dispatchEvent(new MouseEvent('click', { clientX: x, clientY: y, bubbles: true }));""",
                           overlay, (x0 + x1) / 2, (y0 + y1) / 2)
    wait_idle(browser)
    clicked = json.loads(overlay.get_attribute("data-target"))
    assert clicked["detection"] == 1 and clicked != target


def test_compare_view_draws_the_box_on_every_methods_map(browser, task_server, tmp_path):
    open_page(browser, task_server)
    _upload(browser, tmp_path, "shapes-detect")
    second = all_by_testid(browser, "prediction")[1]
    second.find_element("css selector", "button").click()
    wait_idle(browser)
    explained = json.loads(by_testid(browser, "overlay").get_attribute("data-target"))
    maps = _compare_view(browser)
    models = httpx.get(f"{task_server}/models").json()["models"]
    assert len(maps) == len(next(m for m in models if m["name"] == "shapes-detect")["methods"])
    for target, pixels in maps:
        assert target["detection"] == explained["detection"]
        _assert_box_drawn(_magenta(pixels), target["box"])


def test_compare_view_outlines_the_region_on_every_methods_map(browser, task_server, tmp_path):
    open_page(browser, task_server)
    class_map = _upload(browser, tmp_path, "shapes-seg")
    cls = int(all_by_testid(browser, "prediction")[0].get_attribute("data-index"))
    maps = _compare_view(browser)
    assert len(maps) > 1
    for target, pixels in maps:
        assert target["kind"] == "segment" and target["index"] == cls
        _assert_outline_drawn(_magenta(pixels), _region_edge(class_map, cls))


def _samples(server: str) -> dict[str, bytes]:
    return {s["label"]: httpx.get(f"{server}{s['url']}").content for s in httpx.get(f"{server}/ui/samples").json()}


def _api_similarity(server: str, first: bytes, second: bytes, method: str) -> list[float]:
    """The API's similarity of each image to the other (one request, each `similar_to` the other)."""
    targets = json.dumps([{"similar_to": 1, "image": 0}, {"similar_to": 0, "image": 1}])
    r = httpx.post(f"{server}/explain", data={"model": "shapes-embed", "targets": targets, "method": method},
                   files=[("image", ("a.png", first, "image/png")), ("image", ("b.png", second, "image/png"))])
    assert r.status_code == 200, r.text
    return [res["explanations"][0]["score"] for res in r.json()["results"]]


def _press(driver, element) -> None:
    """Enter on a control, as a keyboard user would."""
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.ENTER)
    wait_idle(driver)


def test_embedding_similarity_to_a_reference_shown_and_explained_both_ways(browser, task_server, tmp_curl_dir, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(browser, task_server)
    Select(by_testid(browser, "model-select")).select_by_value("shapes-embed")
    wait_idle(browser)
    assert not browser.find_element(By.ID, "tab-classes").is_displayed()  # no classes to line up
    pick_sample(browser, "circle")
    # No reference yet: no error, no map, and the page says what to do.
    assert not by_testid(browser, "error").is_displayed()
    assert by_testid(browser, "similarity").text == "none"
    assert not by_testid(browser, "overlay").is_displayed()
    assert "reference" in browser.find_element(By.ID, "overlay-caption").text

    _press(browser, browser.find_element(By.CSS_SELECTOR, '[data-testid="reference-sample"][data-label="ring"]'))
    assert not by_testid(browser, "error").is_displayed()
    method = by_testid(browser, "method-select").get_attribute("value")
    samples = _samples(task_server)
    mine, theirs = _api_similarity(task_server, samples["circle"], samples["ring"], method)
    assert mine == pytest.approx(theirs, abs=1e-6)  # a cosine is symmetric
    shown = by_testid(browser, "similarity")
    assert float(shown.get_attribute("data-value")) == pytest.approx(mine, abs=1e-5)
    assert shown.text == f"{float(shown.get_attribute('data-value')):.4f}"
    # Both maps, each over its own image (the samples' pixels tinted by a heatmap that is not flat).
    for testid, label in (("overlay", "circle"), ("overlay-reference", "ring")):
        assert json.loads(by_testid(browser, testid).get_attribute("data-target")) == {"kind": "similarity"}
        pixels = canvas_pixels(browser, testid)
        original = np.asarray(Image.open(io.BytesIO(samples[label])).convert("RGB"))
        assert pixels.shape == original.shape and pixels.std() > 10
        assert np.abs(pixels.astype(int) - original).mean() > 10
    assert canvas_pixels(browser, "overlay").tobytes() != canvas_pixels(browser, "overlay-reference").tobytes()
    assert f"similarity {mine:.4f}" in browser.find_element(By.ID, "overlay-caption").text
    screenshot(browser, shots / "embedding.png")

    # The curl command sends both images (the samples fetched first) and gets the same answer.
    [body] = run_curl(by_testid(browser, "curl").text, tmp_curl_dir)
    assert [r["explanations"][0]["score"] for r in body["results"]] == pytest.approx([mine, theirs], abs=1e-6)

    # Every method's map of the image in the compare view.
    maps = _compare_view(browser)
    assert len(maps) == len(Select(by_testid(browser, "method-select")).options) > 1
    assert all(target == {"kind": "similarity"} and pixels.std() > 10 for target, pixels in maps)
    browser.find_element(By.CSS_SELECTOR, '.tab[data-view="single"]').click()
    wait_idle(browser)

    # Cleared from the keyboard: back to asking for a reference, focus kept in the panel.
    _press(browser, by_testid(browser, "reference-clear"))
    assert by_testid(browser, "similarity").text == "none"
    assert not by_testid(browser, "overlay").is_displayed()
    assert not by_testid(browser, "overlay-reference").is_displayed()
    assert browser.switch_to.active_element == by_testid(browser, "reference-input")
    assert not by_testid(browser, "error").is_displayed()
