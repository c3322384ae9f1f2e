"""``camserve evaluate``: how faithful each CAM method is on a served model, offline.

For every method: the pointing game (where the object's box is known: the map's peak, at the input's
size, inside the box), the confidence metrics (average drop, increase) and the deletion and insertion
areas (``service.cam.metrics``), and the milliseconds per image the explanation took. Images come from
a folder (the explained class is then the model's top-1) or from the built-in shapes scene generator
(the true class, and its box).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.cam import CamQuery
from service.cam.metrics import DEFAULT_STEPS, metrics_work, run
from service.imaging import decode_image
from service.preprocess import to_input_size
from service.registry import LoadedModel

_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_FIGURES = ("average_drop", "increase", "deletion", "insertion")


@dataclass(frozen=True)
class Sample:
    """An ``(H, W, 3)`` uint8 image at the model's input size, its class if known and its box
    ``(x0, y0, x1, y1)`` in input pixels if known."""

    image: np.ndarray
    label: int | None = None
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class MethodReport:
    method: str
    images: int
    pointing_game: float | None
    average_drop: float
    increase: float
    deletion: float
    insertion: float
    ms_per_image: float


def shapes_samples(n: int, seed: int) -> list[Sample]:
    from service.models.scenes import make_scenes

    images, labels, boxes = make_scenes(n, seed)
    out = []
    for i in range(n):
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        out.append(Sample(images[i], int(labels[i]), (x0, y0, x1, y1)))
    return out


def folder_samples(folder: Path, model: LoadedModel, max_pixels: int = 40_000_000) -> list[Sample]:
    """Every image file of ``folder``, resized and cropped as the model's preprocessing does."""
    out = []
    pre = model.preprocess
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES):
        rgb = decode_image(path.read_bytes(), max_pixels)
        image = torch.from_numpy(np.ascontiguousarray(rgb))
        pixels = pre.resized_uint8(image, pre.geometry(rgb.shape[0], rgb.shape[1]))
        out.append(Sample(pixels.permute(1, 2, 0).numpy()))
    if not out:
        raise ValueError(f"no image files in {folder}")
    return out


def _batches(samples: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def evaluate(model: LoadedModel, samples: Sequence[Sample], methods: Sequence[str], *, steps: int = DEFAULT_STEPS,
             batch_size: int = 16, progress: Callable[[str, int, int], None] | None = None) -> list[MethodReport]:
    """One report per method over ``samples``."""
    engine, pre = model.engine, model.preprocess
    size = pre.input_size
    reports = []
    for method in methods:
        engine.check(CamQuery(method=method))
        sums = dict.fromkeys(_FIGURES, 0.0)
        hits = boxed = done = 0
        elapsed = 0.0
        for chunk in _batches(samples, batch_size):
            pixels = torch.stack([torch.from_numpy(np.ascontiguousarray(s.image)).permute(2, 0, 1) for s in chunk])
            x = pre.normalize(pixels.to(model.device))
            if any(s.label is None for s in chunk):
                top = engine.predict(x).argmax(dim=1).tolist()
            classes = [s.label if s.label is not None else top[i] for i, s in enumerate(chunk)]
            start = time.perf_counter()
            out = engine.explain(x, [CamQuery(method=method, classes=(c,)) for c in classes])
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            elapsed += time.perf_counter() - start
            maps = torch.stack([cam.maps[0] for cam in out.cams if cam is not None])
            target = torch.tensor(classes, device=x.device)
            figures = run(metrics_work(engine.predict, x, maps, target, ("confidence", "deletion", "insertion"),
                                       steps=steps, chunk_rows=engine.chunk_rows))
            for name in _FIGURES:
                sums[name] += float(figures[name].sum())
            for s, heat in zip(chunk, to_input_size(maps, size), strict=True):
                if s.box is not None:
                    y, xx = divmod(int(heat.argmax()), size[1])
                    x0, y0, x1, y1 = s.box
                    hits += x0 <= xx < x1 and y0 <= y < y1
                    boxed += 1
            done += len(chunk)
            if progress is not None:
                progress(method, done, len(samples))
        reports.append(MethodReport(method, done, hits / boxed if boxed else None, sums["average_drop"] / done,
                                    sums["increase"] / done, sums["deletion"] / done, sums["insertion"] / done,
                                    1000 * elapsed / done))
    return reports


def table(reports: Sequence[MethodReport]) -> str:
    """A Markdown table, one row per method."""
    rows = ["| method | pointing game | average drop | increase | deletion | insertion | ms / image |",
            "|---|---|---|---|---|---|---|"]
    for r in reports:
        pointing = "n/a" if r.pointing_game is None else f"{r.pointing_game:.3f}"
        rows.append(f"| {r.method} | {pointing} | {r.average_drop:.3f} | {r.increase:.3f} | {r.deletion:.3f} "
                    f"| {r.insertion:.3f} | {r.ms_per_image:.1f} |")
    return "\n".join(rows)


def progress_bar(method: str, done: int, total: int) -> None:
    """A one-line bar on stderr, redrawn in place."""
    width = 30
    filled = width * done // max(1, total)
    end = "\n" if done >= total else ""
    print(f"\r{method:>20} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr,
          flush=True)
