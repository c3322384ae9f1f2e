"""The GPU check (``make gpu-check``): what a CUDA machine is the first to find, in one bounded run.

``python -m tests.gpu.gpu_check [--device cuda] [--out DIR] [--small] PART...``; parts, in order:

- ``parity``: every method (and ``smooth``, ``fuse``, ``metrics``) on the device in fp32, bf16 and fp16
  against the same engine on the CPU in fp32: Pearson r of each map, largest logit difference, any error;
  then five more torchvision families with the gradient methods and EigenCAM.
- ``syncs``: host synchronisations inside the batched path, per method (``torch.cuda.set_sync_debug_mode``).
- ``speed``: resnet50 predict and explain ms at batch 1, 64 and 256, fp32 and bf16.
- ``http``: a real server on the device: resnet50 ``/predict`` and ``/explain`` at concurrency 1 and 64,
  batched against ``max_batch_size=1``; bf16; five targets.
- ``oom``: a server whose process may use 1.5 GB (then 0.25 GB) of the GPU receives 64 images in one
  request: it splits the batch and answers 200, or answers a JSON error, and stays alive.
- ``cudatests``: the tests marked ``needs_cuda``.
- ``bench``: ``tests.bench.bench_engine --device cuda``.
- ``table``: one Markdown table of the targets from the JSON lines (also written to ``gpu-table.md``).

``all`` runs them all. Each record is one JSON line in ``DIR/gpu.jsonl`` (``$OUT`` by default). With
``--device cpu --small`` (the dry run the suite runs) the same code runs on CPU autocast at small sizes, and
the parts that need CUDA record why they were skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from service.cam import CamEngine, CamQuery
from service.cam.methods import METHODS
from tests.api.server import ROOT, free_port, start_server
from tests.bench.bench_http import _request_bytes, load

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Targets of the GPU run (stated in docs/precision.md once measured).
TARGETS = {"parity_fp32": 0.999, "parity_reduced": 0.99, "batching_gain_c64": 4.0, "explain_over_predict_c64": 1.10}
FAMILIES = ("densenet121", "vit_b_16", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny")


@dataclass
class Check:
    device: torch.device
    out: Path
    small: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def emit(self, **record: Any) -> None:
        record["t"] = round(time.time(), 1)
        line = json.dumps(record, default=str)
        print(line, flush=True)
        with (self.out / "gpu.jsonl").open("a") as f:
            f.write(line + "\n")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed_ms(self, fn: Callable[[], object], reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1000)
        return round(statistics.median(times), 2)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    d = float(a.norm() * b.norm())
    if d == 0:
        return 1.0 if torch.equal(a, b) else 0.0
    return float(a @ b) / d


def _describe(q: CamQuery) -> dict[str, object]:
    return {k: v for k, v in q.__dict__.items() if v not in ((), None) and k != "metric_steps"}


# -- parity -----------------------------------------------------------------------------------------------
def _small_net() -> torch.nn.Module:
    """The dry run's stand-in for resnet18: a seeded CNN ending in a ReLU, global pooling and one linear layer."""
    torch.manual_seed(0)
    nn = torch.nn
    features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
    model = nn.Sequential()
    model.add_module("features", features)
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(32, 10))
    return model.eval()


def part_parity(c: Check) -> None:
    size = 32 if c.small else 224
    torch.manual_seed(0)
    if c.small:
        name, r18, layers = "small", _small_net(), {"mid": "features.2", "last": "features", "inner": "features.3"}
    else:
        name, r18 = "resnet18", torchvision.models.resnet18().eval()
        layers = {"mid": "layer3", "last": "layer4", "inner": "layer4.1.conv2"}
    x18 = torch.randn(2, 3, size, size)
    cases: list[tuple[str, torch.nn.Module, torch.Tensor, CamQuery]] = [
        (name, r18, x18, CamQuery(method=m, classes=(1, 7))) for m in METHODS]
    cases += [
        (name, r18, x18, CamQuery(classes=(1,), smooth="aug")),
        (name, r18, x18, CamQuery(method="gradcam++", classes=(1,), smooth="eigen")),
        (name, r18, x18, CamQuery(classes=(1,), layer=(layers["mid"], layers["last"]), fuse="product")),
        (name, r18, x18, CamQuery(method="ablationcam", classes=(1,), layer=layers["inner"])),
        (name, r18, x18, CamQuery(classes=(1,), metrics=("confidence", "deletion", "insertion"),
                                  metric_steps=8 if c.small else 16)),
    ]
    for family in () if c.small else FAMILIES:
        torch.manual_seed(1)
        model = torchvision.models.get_model(family).eval()
        if family == "vit_b_16":  # torchvision zeroes the head: every logit would be 0
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        x = torch.randn(2, 3, 224, 224)
        cases += [(family, model, x, CamQuery(method=m, classes=(3, 5)))
                  for m in ("gradcam", "gradcam++", "layercam", "hirescam", "eigencam")]
    engines: dict[tuple[str, str], CamEngine] = {}
    for name, model, x, q in cases:
        record: dict[str, Any] = {"part": "parity", "model": name, "query": _describe(q)}
        try:
            if (name, "cpu") not in engines:
                engines[(name, "cpu")] = CamEngine(model, x[:1])
                engines[(name, "dev")] = CamEngine(copy.deepcopy(model).to(c.device), x[:1].to(c.device))
            ref = engines[(name, "cpu")].explain(x, [q] * len(x))
            dev = engines[(name, "dev")]
            xd = x.to(c.device)
            for precision, dtype in PRECISIONS.items():
                with torch.autocast(c.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    if not c.small:
                        record[f"{precision}_ms"] = c.timed_ms(lambda dev=dev, xd=xd, q=q: dev.explain(xd, [q] * 2), 3)
                    out = dev.explain(xd, [q] * len(xd))
                maps = [(a, b) for a, b in zip(out.cams, ref.cams, strict=True) if a is not None and b is not None]
                record[f"{precision}_r"] = round(min(pearson(a.maps.cpu(), b.maps) for a, b in maps), 5)
                record[f"{precision}_logit_diff"] = round(float((out.logits.cpu() - ref.logits).abs().max()), 5)
                if q.metrics and maps[0][0].metrics is not None and maps[0][1].metrics is not None:
                    record[f"{precision}_metric_diff"] = round(max(
                        float((maps[0][0].metrics[k].cpu() - v).abs().max()) for k, v in maps[0][1].metrics.items()), 4)
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"[:400]
            record["traceback"] = traceback.format_exc()[-1200:]
        c.emit(**record)


# -- host synchronisations ------------------------------------------------------------------------------------
def part_syncs(c: Check) -> None:
    if not c.cuda:
        c.emit(part="syncs", skipped="needs CUDA (torch.cuda.set_sync_debug_mode)")
        return
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().to(c.device)
    x = torch.randn(4, 3, 224, 224, device=c.device)
    engine = CamEngine(model, x[:1])
    for name in METHODS:
        q = [CamQuery(method=name, classes=(1, 2))] * len(x)
        engine.explain(x, q)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.explain(x, q)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        where = sorted({f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in caught})
        c.emit(part="syncs", method=name, count=len(caught), where=where[:12])


# -- speed ------------------------------------------------------------------------------------------------
def part_speed(c: Check) -> None:
    torch.manual_seed(0)
    size = 32 if c.small else 224
    name = "resnet18" if c.small else "resnet50"
    model = torchvision.models.get_model(name).eval().to(c.device).to(memory_format=torch.channels_last)
    engine = CamEngine(model, torch.zeros(1, 3, size, size, device=c.device), chunk_rows=64)
    for n in (1, 2) if c.small else (1, 64, 256):
        x = torch.randn(n, 3, size, size, device=c.device).contiguous(memory_format=torch.channels_last)
        q = [CamQuery(classes=(1,))] * n
        row: dict[str, Any] = {"part": "speed", "model": name, "batch": n}
        for precision in ("fp32", "bf16"):
            dtype = PRECISIONS[precision]
            with torch.autocast(c.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                row[f"{precision}_predict_ms"] = p = c.timed_ms(lambda x=x: engine.predict(x), 1 if c.small else 10)
                row[f"{precision}_explain_ms"] = e = c.timed_ms(lambda x=x, q=q: engine.explain(x, q),
                                                                1 if c.small else 10)
            row[f"{precision}_explain_over_predict"] = round(e / p, 3)
            row[f"{precision}_explain_img_s"] = round(n / e * 1000, 1)
        c.emit(**row)


# -- a real server --------------------------------------------------------------------------------------------
def _jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[40:180, 60:200] = (200, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _config(c: Check, tmp: Path, name: str, models: dict[str, dict[str, str]]) -> Path:
    lines = []
    for model, keys in models.items():
        lines.append(f"[models.{model}]")
        lines += [f'{k} = "{v}"' for k, v in {**keys, "device": c.device.type}.items()]
        if c.small:
            lines.append(f"[models.{model}.preprocess]\nresize = 64\ncrop = 64")
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def part_http(c: Check) -> None:
    tmp = Path(tempfile.mkdtemp())
    r50 = {"source": "torchvision:resnet50", "weights": "none"}
    config = _config(c, tmp, "http", {"r50": r50, "r50bf": {**r50, "precision": "bf16"}})
    image = _jpeg(1)
    wide = 8 if c.small else 64
    per_cell = {1: 8 if c.small else 60, wide: 4 * wide if c.small else 16 * wide}
    results: dict[tuple[str, str, str, int], dict[str, float]] = {}
    for server, batch in (("batched", "64"), ("unbatched", "1")):
        port = free_port()
        env = {"SERVICE_MAX_BATCH_SIZE": batch, "SERVICE_MAX_QUEUE": "1024", "SERVICE_LOG_LEVEL": "warning"}
        try:
            proc = start_server(port, env, config, ready_timeout_s=180, log=c.out / f"server-{server}.log")
        except RuntimeError as exc:
            c.emit(part="http", server=server, error=str(exc)[-600:])
            continue
        try:
            cells = [("r50", p, n) for p in ("/predict", "/explain") for n in (1, wide)]
            if server == "batched":
                cells += [("r50bf", "/predict", wide), ("r50bf", "/explain", wide),
                          ("r50", "/explain?top_k=5&targets=0,1,2,3,4", wide)]
            for model, path, n in cells:
                full = f"{path}{'&' if '?' in path else '?'}model={model}"
                try:
                    p50, p95, ips = asyncio.run(load(port, _request_bytes(port, full, image), n, per_cell[n]))
                except RuntimeError as exc:  # a non-200 answer
                    c.emit(part="http", server=server, model=model, path=path, concurrency=n, error=str(exc))
                    continue
                results[(server, model, path, n)] = {"p50_ms": round(p50, 2), "p95_ms": round(p95, 2),
                                                     "req_s": round(ips, 1)}
                c.emit(part="http", server=server, model=model, path=path, concurrency=n,
                       **results[(server, model, path, n)])
        finally:
            proc.terminate()
            proc.wait(30)

    def req_s(*key: Any) -> float | None:
        return results.get(key, {}).get("req_s")

    summary: dict[str, Any] = {"part": "http_summary", "concurrency": wide}
    for path in ("/predict", "/explain"):
        a, b = req_s("batched", "r50", path, wide), req_s("unbatched", "r50", path, wide)
        summary[f"batching_gain{path.replace('/', '_')}"] = round(a / b, 2) if a and b else None
    for model in ("r50", "r50bf"):
        p, e = req_s("batched", model, "/predict", wide), req_s("batched", model, "/explain", wide)
        summary[f"explain_over_predict_{model}"] = round(p / e, 3) if p and e else None
    c.emit(**summary)


_OOM_FACTORY = '''
import os
import torch, torchvision

def build():
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(float(os.environ["GPU_FRACTION"]), 0)
    torch.manual_seed(0)
    return torchvision.models.resnet50()
'''


def _multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = "camservegpu"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="i{i}.jpg"\r\n'
             f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def part_oom(c: Check) -> None:
    import httpx

    tmp = Path(tempfile.mkdtemp())
    (tmp / "oomfactory.py").write_text(_OOM_FACTORY)
    config = _config(c, tmp, "oom", {"m": {"source": "python:oomfactory:build"}})
    total = torch.cuda.get_device_properties(0).total_memory if c.cuda else 1 << 40
    files = [_jpeg(i) for i in range(8 if c.small else 64)]
    body, ctype = _multipart(files)
    for gb in (1.5, 0.25):
        port = free_port()
        env = {"GPU_FRACTION": f"{gb * 1e9 / total:.6f}", "PYTHONPATH": f"{tmp}{os.pathsep}{ROOT}",
               "SERVICE_MAX_BATCH_SIZE": "64", "SERVICE_MAX_IMAGES_PER_REQUEST": "64", "SERVICE_LOG_LEVEL": "info"}
        record: dict[str, Any] = {"part": "oom", "limit_gb": gb}
        try:
            proc = start_server(port, env, config, ready_timeout_s=180, log=c.out / f"server-oom{gb}.log")
        except RuntimeError as exc:  # the warm-up itself may not fit: the load fails, which is a result too
            record["load_error"] = str(exc)[-600:]
            c.emit(**record)
            continue
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
                for path in ("/predict", "/explain?output=array&size=feature"):
                    r = client.post(path, content=body, headers={"Content-Type": ctype})
                    key = path.split("?")[0].strip("/")
                    record[f"{key}_status"] = r.status_code
                    if r.status_code >= 500:
                        record[f"{key}_body"] = r.text[:300]
                        record[f"{key}_json"] = r.headers.get("content-type", "").startswith("application/json")
                    elif r.status_code == 200 and key == "predict":
                        one, one_type = _multipart(files[:1])
                        alone = client.post("/predict", content=one, headers={"Content-Type": one_type}).json()
                        batch = r.json()
                        record["predict_top_matches_alone"] = (batch["results"][0]["predictions"][0]["index"]
                                                               == alone["results"][0]["predictions"][0]["index"])
                record["healthz_after"] = client.get("/healthz").status_code
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"[:400]
        finally:
            proc.terminate()
            proc.wait(30)
        log = (c.out / f"server-oom{gb}.log").read_text(errors="replace").splitlines()
        record["memory_log"] = [line[:200] for line in log if "memory" in line.lower()][:6]
        c.emit(**record)


# -- the suite's CUDA tests and the engine benchmark ------------------------------------------------------------
def _run(c: Check, part: str, cmd: list[str], timeout_s: float) -> None:
    t0 = time.time()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        (c.out / f"{part}.log").write_text(done.stdout + done.stderr)
        c.emit(part=part, rc=done.returncode, tail=(done.stdout + done.stderr)[-1500:], s=round(time.time() - t0, 1))
    except subprocess.TimeoutExpired:
        c.emit(part=part, error=f"timed out after {timeout_s:g} s")


def part_cudatests(c: Check) -> None:
    if not c.cuda:
        c.emit(part="cudatests", skipped="needs CUDA")
        return
    _run(c, "cudatests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "needs_cuda",
                          "tests/test_pipeline.py", "tests/cam", "tests/test_precision.py"], 40)


def part_bench(c: Check) -> None:
    if not c.cuda:
        c.emit(part="bench", skipped="needs CUDA")
        return
    _run(c, "bench", [sys.executable, "-m", "tests.bench.bench_engine", "--device", "cuda", "--batches", "1,8,64",
                      "--perturbation-batches", "1,8"], 55)


# -- the table ------------------------------------------------------------------------------------------------
def table(records: list[dict[str, Any]]) -> str:
    """One Markdown table of the targets, from the JSON lines of a run."""
    rows: list[tuple[str, str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    parity = [r for r in records if r.get("part") == "parity"]
    errors = [r for r in parity if "error" in r]
    for precision, need in (("fp32", TARGETS["parity_fp32"]), ("bf16", TARGETS["parity_reduced"]),
                            ("fp16", TARGETS["parity_reduced"])):
        rs = [r[f"{precision}_r"] for r in parity if f"{precision}_r" in r]
        worst = min(rs) if rs else None
        rows.append((f"parity {precision}, min r over {len(rs)} cases", f">= {need}",
                     "-" if worst is None else f"{worst:.4f}", verdict(None if worst is None else worst >= need)))
    rows.append(("parity cases that raised", "0", str(len(errors)), verdict(not errors if parity else None)))
    summary = next((r for r in records if r.get("part") == "http_summary"), {})
    for key in ("batching_gain_predict", "batching_gain_explain"):
        value = summary.get(key)
        rows.append((f"{key.replace('_', ' ')}, concurrency {summary.get('concurrency', 64)}",
                     f">= {TARGETS['batching_gain_c64']}x", "-" if value is None else f"{value}x",
                     verdict(None if value is None else value >= TARGETS["batching_gain_c64"])))
    value = summary.get("explain_over_predict_r50bf")
    rows.append(("explain / predict time over HTTP, bf16", f"<= {TARGETS['explain_over_predict_c64']}",
                 "-" if value is None else str(value),
                 verdict(None if value is None else value <= TARGETS["explain_over_predict_c64"])))
    http = [r for r in records if r.get("part") == "http"]
    rows.append(("HTTP cells that failed", "0", str(sum("error" in r for r in http)),
                 verdict(not any("error" in r for r in http) if http else None)))
    oom = [r for r in records if r.get("part") == "oom"]
    five = [r for r in oom for k, v in r.items() if k.endswith("_status") and v >= 500 and not r.get(f"{k[:-7]}_json")]
    alive = all(r.get("healthz_after") == 200 for r in oom if "load_error" not in r)
    rows.append(("memory cap: 5xx without a JSON error, or a dead server", "0",
                 str(len(five) + (0 if alive else 1)), verdict(not five and alive if oom else None)))
    for part in ("cudatests", "bench"):
        rec = next((r for r in records if r.get("part") == part and ("rc" in r or "error" in r)), None)
        rows.append((part, "rc 0", "-" if rec is None else str(rec.get("rc", rec.get("error"))),
                     verdict(None if rec is None else rec.get("rc") == 0)))
    lines = ["| check | target | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def part_table(c: Check) -> None:
    path = c.out / "gpu.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    text = table(records)
    (c.out / "gpu-table.md").write_text(text + "\n")
    print(text, flush=True)


PARTS: dict[str, Callable[[Check], None]] = {
    "parity": part_parity, "syncs": part_syncs, "speed": part_speed, "http": part_http, "oom": part_oom,
    "cudatests": part_cudatests, "bench": part_bench, "table": part_table,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", choices=[*PARTS, "all"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    parser.add_argument("--small", action="store_true", help="small sizes: the dry run on CPU")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(torch.device(args.device), out, args.small)
    for part in list(PARTS) if "all" in args.parts else args.parts:
        t0 = time.time()
        try:
            PARTS[part](check)
        except Exception as exc:
            check.emit(part=part, fatal=f"{type(exc).__name__}: {exc}"[:400], traceback=traceback.format_exc()[-2000:])
        check.emit(part=part, done_s=round(time.time() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
