"""The page on the built-in detector and segmenter, in headless Chromium against a real uvicorn: the list shows
what the model found, a row explains it, and the overlay draws the explained box or the region's outline."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from service.models.multiscenes import make_multi_scenes
from tests.api.conftest import png_bytes
from tests.ui.conftest import _serve
from tests.ui.test_page import all_by_testid, by_testid, canvas_pixels, open_page, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SCALE = 4


@pytest.fixture(scope="module")
def task_server(tmp_path_factory) -> Iterator[str]:
    config = tmp_path_factory.mktemp("tasks") / "models.toml"
    config.write_text('[models.shapes-detect]\nsource = "builtin:shapes-detect"\n\n'
                      '[models.shapes-seg]\nsource = "builtin:shapes-seg"\n')
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
    box = target["box"]
    magenta = _magenta(canvas_pixels(browser))
    assert magenta.sum() > 100
    x0, y0, x1, y1 = box
    ys, xs = np.nonzero(magenta)
    # The drawing is the box (and its label just above it), nowhere else.
    assert ((xs >= x0 - 3) & (xs <= x1 + 3) & (ys >= y0 - 20) & (ys <= y1 + 3)).mean() > 0.99
    assert magenta[int(y0) + 4 : int(y1) - 3, int(x0) + 4 : int(x1) - 3].sum() == 0


def test_segments_listed_and_the_region_outlined(browser, task_server, tmp_path):
    open_page(browser, task_server)
    class_map = _upload(browser, tmp_path, "shapes-seg")
    rows = all_by_testid(browser, "prediction")
    assert rows and "px" in rows[0].text
    cls = int(rows[0].get_attribute("data-index"))
    truth = np.kron(class_map, np.ones((SCALE, SCALE), dtype=np.uint8)) == cls
    magenta = _magenta(canvas_pixels(browser))
    padded = np.pad(truth, 1)
    edge = truth & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    assert magenta.sum() > 20
    # The outline follows the region's boundary (the predicted mask, close to the truth).
    assert magenta[edge].mean() > 0.8 and magenta[~edge].mean() < 0.01


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
