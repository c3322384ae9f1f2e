"""ONNX Runtime benchmark (part of ``make bench``): a torchvision resnet50 (random weights, 224x224) served
from ``onnx:`` against the same model in eager PyTorch, in one process.

Rows: eager predict, ONNX Runtime predict, and the gradient-free explanations through ONNX Runtime (EigenCAM at
the default layer, ScoreCAM at a narrower layer so that a run stays short). Every turn times each variant once,
in an order rotated turn by turn; the ratios are medians of the per-turn ratios, so a noisy shared machine
slows both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from service.cam import CamEngine, CamQuery
from service.registry import ModelSpec, load_model


def turns(fns: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Milliseconds of each function, ``n`` turns, each turn calling every function once (rotated order)."""
    names = list(fns)
    for name in names:  # warm-up
        fns[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(n):
        for k in range(len(names)):
            name = names[(turn + k) % len(names)]
            t0 = time.perf_counter()
            fns[name]()
            out[name].append((time.perf_counter() - t0) * 1000)
    return out


def ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--scorecam-layer", default="/layer1/layer1.2/relu_2/Relu_output_0",
                        help="ONNX tensor ScoreCAM targets (layer1: 256 channels, one masked forward each)")
    parser.add_argument("--scorecam-turns", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(args.batch, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, x[:1], str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
        served = load_model(ModelSpec("r50", f"onnx:{path}", device="cpu"))
    eager = CamEngine(model.to(memory_format=torch.channels_last), x[:1])
    onnx = served.engine
    eigen = [CamQuery(method="eigencam")] * len(x)
    fns: dict[str, Callable[[], object]] = {
        "eager predict": lambda: eager.predict(x),
        "onnx predict": lambda: onnx.predict(x),
        "onnx eigencam": lambda: onnx.explain(x, eigen),
    }
    times = turns(fns, args.turns)
    score = turns({"onnx predict": lambda: onnx.predict(x),
                   "onnx scorecam": lambda: onnx.explain(x, [CamQuery(method="scorecam", layer=args.scorecam_layer)]
                                                         * len(x))}, args.scorecam_turns)
    channels = onnx.layers.channels[args.scorecam_layer]
    print(f"resnet50 224x224 batch {args.batch}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'};"
          f" {args.turns} turns (ScoreCAM {args.scorecam_turns})")
    print("| variant | median ms | ratio |")
    print("|---|---|---|")
    print(f"| eager PyTorch predict | {statistics.median(times['eager predict']):.1f} | 1 |")
    print(f"| ONNX Runtime predict | {statistics.median(times['onnx predict']):.1f} | "
          f"{ratio(times['onnx predict'], times['eager predict']):.2f}x eager |")
    print(f"| ONNX Runtime EigenCAM (default layer) | {statistics.median(times['onnx eigencam']):.1f} | "
          f"{ratio(times['onnx eigencam'], times['onnx predict']):.2f}x ONNX predict |")
    print(f"| ONNX Runtime ScoreCAM ({channels} channels) | {statistics.median(score['onnx scorecam']):.0f} | "
          f"{ratio(score['onnx scorecam'], score['onnx predict']):.0f}x ONNX predict |")
    eager.close()
    served.close()


if __name__ == "__main__":
    main()
