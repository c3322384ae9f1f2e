"""``camserve evaluate``: the report's figures, from scenes with boxes and from a folder without."""

from __future__ import annotations

import numpy as np

from service.cli import main
from service.config import DEFAULT_MODELS
from service.evaluation import Sample, evaluate, shapes_samples, table
from service.imaging import encode_png
from service.registry import ModelSpec, load_model, serve_module
from tests.api.models import TINY_PRE, Tiny


def test_shapes_report_has_every_figure():
    loaded = load_model(DEFAULT_MODELS[0])
    (report,) = evaluate(loaded, shapes_samples(8, seed=3), ["gradcam"], steps=4)
    assert report.images == 8 and report.pointing_game is not None and 0 <= report.pointing_game <= 1
    assert 0 <= report.deletion <= 1 and 0 <= report.insertion <= 1 and report.ms_per_image > 0
    assert "| gradcam |" in table([report])


def test_images_without_labels_have_no_pointing_game():
    loaded = serve_module(Tiny(), ModelSpec(name="t", source="python:x:y"), ["a", "b", "c", "d"], TINY_PRE)
    samples = [Sample(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(3)]
    (report,) = evaluate(loaded, samples, ["eigencam"], steps=4, batch_size=2)
    assert report.pointing_game is None and report.images == 3


def test_cli_prints_a_table(tmp_path, capsys):
    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(encode_png(np.full((64, 64, 3), 40 * i, dtype=np.uint8)))
    assert main(["evaluate", "--images", str(tmp_path), "--methods", "gradcam", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 images" in out and "| gradcam | n/a |" in out
