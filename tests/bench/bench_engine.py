"""Engine benchmark (``make bench``): explain vs predict, and vs pytorch-grad-cam and captum.

One table from one run on a torchvision resnet50 with random weights at 224x224, batch 1 and 8.
Every figure is the median of several runs; ratios are to this run's own predict time, which is
what makes them comparable across noisy shared machines.

A second table compares the perturbation methods (AblationCAM, ScoreCAM) with pytorch-grad-cam's on
resnet18 at 224x224, its default layer, batch 1 and 8, 1 and 5 targets; each cell times ours and the
reference alternately and reports the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

# pytorch-grad-cam's progress bars would flood the table; tqdm reads this when it is imported.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import torchvision
from captum.attr import LayerGradCam
from pytorch_grad_cam import AblationCAM, GradCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from service.cam import CamEngine, CamQuery
from service.models.shapes import load_shapes
from service.preprocess import to_input_size
from tests.bench import cpu_name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def interleaved_ms(fns: list[Callable[[], object]], device: torch.device, repeats: int,
                   warmups: int = 2) -> list[float]:
    """Median ms of each function, timed in rounds that call each once."""
    for fn in fns:
        for _ in range(warmups):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times, strict=True):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            acc.append((time.perf_counter() - t0) * 1000)
    return [statistics.median(acc) for acc in times]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=0, help="0: 7 at batch 1, 3 above (CPU); 20 on CUDA")
    parser.add_argument("--model", default="resnet50", help="a torchvision classifier (random weights) or shapes")
    parser.add_argument("--perturbation", default="ablationcam,scorecam",
                        help="perturbation methods to compare with pytorch-grad-cam on resnet18 ('' for none)")
    parser.add_argument("--perturbation-batches", default="1,8")
    parser.add_argument("--perturbation-repeats", type=int, default=0, help="0: 3 on CUDA, 1 on CPU")
    parser.add_argument("--only-perturbation", action="store_true")
    parser.add_argument("--reference-max-calls", type=int, default=8,
                        help="over this many images x targets, the reference is timed on one target and its time "
                             "multiplied by the number of targets (it makes one identical call per target)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.model == "shapes":
        model, size = load_shapes()[0].to(device), 64
    else:
        model, size = torchvision.models.get_model(args.model).eval().to(device), 224
    print(f"# engine benchmark: {args.model} ({'shipped' if args.model == 'shapes' else 'random'} weights), "
          f"{size}x{size}, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{cpu_name()}")
    if not args.only_perturbation:
        print("| batch | predict ms | explain 1 | explain 5 | pytorch-grad-cam 1 | pytorch-grad-cam 5 | captum 1 "
              "| captum 5 |")
        print("|---|---|---|---|---|---|---|---|")
        for n in (int(b) for b in args.batches.split(",")):
            reps = args.repeats or (20 if device.type == "cuda" else 7 if n == 1 else 3)
            print(_row(model, torch.randn(n, 3, size, size, device=device), reps))
    methods = [m for m in args.perturbation.split(",") if m]
    if methods:
        reps = args.perturbation_repeats or (3 if device.type == "cuda" else 1)
        _perturbation_table(methods, [int(b) for b in args.perturbation_batches.split(",")], device, reps,
                            args.reference_max_calls)


def _row(model: torch.nn.Module, x: torch.Tensor, reps: int) -> str:
    device = x.device
    targets5 = [1, 2, 3, 4, 0]
    engine = CamEngine(model, x[:1])
    size = (x.shape[2], x.shape[3])

    def explain(k: int) -> None:
        out = engine.explain(x, [CamQuery(classes=tuple(targets5[:k]))] * len(x))
        for cam in out.cams:
            assert cam is not None
            to_input_size(cam.maps, size)

    # Interleaved rounds, so drift in the machine's speed hits the three alike.
    predict, ours1, ours5 = interleaved_ms([lambda: engine.predict(x), lambda: explain(1), lambda: explain(5)],
                                           device, reps)
    engine.close()
    for p in model.parameters():
        p.requires_grad_(True)  # the references backpropagate into the parameters
    layer = dict(model.named_modules())[engine.layers.default]  # the references explain the same layer

    def gradcam_lib(k: int) -> None:
        # pytorch-grad-cam takes one target per image and call, so k targets are k calls.
        with GradCAM(model=model, target_layers=[layer]) as cam:
            for c in targets5[:k]:
                cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * len(x))

    lgc = LayerGradCam(model, layer)

    def captum(k: int) -> None:
        for c in targets5[:k]:
            attr = lgc.attribute(x, target=c, relu_attributions=True)
            torch.nn.functional.interpolate(attr, size=size, mode="bilinear")

    ref = {(name, k): median_ms(lambda f=f, k=k: f(k), device, reps)
           for name, f in (("pgc", gradcam_lib), ("captum", captum)) for k in (1, 5)}
    row = [f"{predict:.1f}", f"{ours1:.1f} ({ours1 / predict:.2f}x)", f"{ours5:.1f} ({ours5 / predict:.2f}x)"]
    row += [f"{ref[(name, k)]:.1f} ({ref[(name, k)] / predict:.2f}x)" for name in ("pgc", "captum") for k in (1, 5)]
    return (f"| {len(x)} | " + " | ".join(row) + " |\n"
            f"<!-- batch {len(x)}: explain-5 is {ref[('pgc', 5)] / ours5:.1f}x faster than pytorch-grad-cam, "
            f"{ref[('captum', 5)] / ours5:.1f}x faster than captum -->")


def _perturbation_table(methods: list[str], batches: list[int], device: torch.device, reps: int,
                        max_calls: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().to(device)
    print(f"\n# perturbation methods vs pytorch-grad-cam: resnet18 (random weights), 224x224, {device}, "
          f"median of {reps}")
    print("| method | batch | targets | camserve ms | pytorch-grad-cam ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for n in batches:
        x = torch.randn(n, 3, 224, 224, device=device)
        for method in methods:
            for k in (1, 5):
                # pytorch-grad-cam's cost is one identical call per target, so past `max_calls` (its batch 8
                # x 5 targets takes most of an hour on a 2-core CPU) one call is timed and multiplied.
                calls = 1 if n * k > max_calls else k
                mine, ref = _perturbation_cell(model, x, method, k, reps, calls)
                ref *= k / calls
                shown = f"{ref:.1f}" if calls == k else f"{ref:.1f} ({k} x 1 call)"
                print(f"| {method} | {n} | {k} | {mine:.1f} | {shown} | {ref / mine:.1f}x |", flush=True)


def _perturbation_cell(model: torch.nn.Module, x: torch.Tensor, method: str, k: int, reps: int,
                       reference_calls: int) -> list[float]:
    """Medians of ours (all ``k`` targets) and of the reference's first ``reference_calls`` calls."""
    targets = [1, 2, 3, 4, 0][:k]
    reference = {"ablationcam": AblationCAM, "scorecam": ScoreCAM}[method]
    engine = CamEngine(model, x[:1], chunk_rows=64 if x.device.type == "cuda" else 32)
    layer = dict(model.named_modules())[engine.layers.default]

    def ours() -> None:
        engine.explain(x, [CamQuery(method=method, classes=tuple(targets))] * len(x))

    def theirs() -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        # One target per image and call, so k targets are k calls.
        with reference(model=model, target_layers=[layer]) as cam:
            for c in targets[:reference_calls]:
                cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * len(x))
        for p in model.parameters():
            p.requires_grad_(False)

    try:
        return interleaved_ms([ours, theirs], x.device, reps, warmups=1 if x.device.type == "cuda" else 0)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
