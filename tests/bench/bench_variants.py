"""A/B of server variants (``make bench-http`` is the full grid): the same model served several ways
(environment settings), one endpoint and concurrency, measured in interleaved rounds.

    python -m tests.bench.bench_variants --model resnet18 --path /predict --concurrency 1 --rounds 5 \\
        --variant default= --variant passive=OMP_WAIT_POLICY=PASSIVE --baseline

Each ``--variant NAME=K=V,K=V`` is one camserve server with those environment variables (none after
``NAME=``); ``--before REF`` adds a server running commit ``REF``'s code with default settings, and
``--baseline`` the newcomer baseline (resnet18 only). Prints per-variant medians and
the median of per-round ratios to the first variant (to the baseline, when there is one).
``--paired`` (concurrency 1) has the servers take turns request by request instead, ``--requests``
turns a round, and gives medians of per-turn ratios (see ``bench_http.paired``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from tests.bench.bench_http import (
    ROOT,
    Cell,
    Server,
    Turns,
    _png,
    export_commit,
    launch_baseline,
    launch_camserve,
    make_scene,
    measure,
    wait_ready,
)


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, settings = text.partition("=")
    env = dict(item.split("=", 1) for item in settings.split(",") if item)
    return name, env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("shapes", "resnet18"), default="shapes")
    parser.add_argument("--path", default="/explain")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variant", action="append", type=_variant, required=True)
    parser.add_argument("--baseline", action="store_true", help="also the newcomer baseline (resnet18)")
    parser.add_argument("--before", metavar="REF", help="also a server of this commit's code, default settings")
    parser.add_argument("--paired", action="store_true", help="concurrency 1, servers taking turns request by request")
    args = parser.parse_args()
    if args.paired and args.concurrency != 1:
        parser.error("--paired measures concurrency 1")
    rng = np.random.default_rng(0)
    scene = make_scene(rng).image
    if args.model == "shapes":
        image = _png(scene)
        source = 'source = "builtin:shapes"'
    else:  # the same 256x256 photo-like JPEG as bench_http's resnet18 cells
        image = _png(np.asarray(Image.fromarray(make_scene(rng).image).resize((256, 256), Image.BILINEAR)), "JPEG")
        source = 'source = "torchvision:resnet18"\nweights = "none"'
    config = Path(tempfile.mkdtemp()) / "models.toml"
    config.write_text(f'[models.m]\n{source}\ndevice = "cpu"\n')
    servers: dict[str, Server] = {name: launch_camserve(name, config, env, ROOT) for name, env in args.variant}
    if args.before:
        servers[f"before ({args.before})"] = launch_camserve("before", config, {}, export_commit(args.before))
    if args.baseline:
        servers["resnet18 baseline"] = launch_baseline("cpu")
    try:
        wait_ready(list(servers.values()))
        turns = Turns(tuple(servers), args.path, "img", args.requests)
        cells = [] if args.paired else [Cell(name, args.path, args.concurrency, "img", args.requests)
                                        for name in servers]
        measure(cells, servers, {"img": image}, args.rounds, turns=[turns] if args.paired else [])
    finally:
        for s in servers.values():
            s.proc.terminate()
    if args.paired:
        ref = len(servers) - 1 if args.baseline else 0
        print(f"| {args.model} {args.path}, {args.rounds} x {args.requests} turns | p50 ms | p95 ms | "
              f"per-turn p50 / {turns.servers[ref]} |")
        print("|---|---|---|---|")
        for k, name in enumerate(turns.servers):
            print(f"| {name} | {turns.p50(k):.1f} | {turns.p95(k):.1f} | {turns.ratio(k, ref):.3f} |")
        return
    ref = cells[-1] if args.baseline else cells[0]
    print(f"| {args.model} {args.path} c={args.concurrency} | p50 ms | images/s | p50 / {ref.server} | "
          f"images/s / {ref.server} |")
    print("|---|---|---|---|---|")
    for c in cells:
        p50 = statistics.median(a[0] / b[0] for a, b in zip(c.results, ref.results, strict=True))
        ips = statistics.median(a[2] / b[2] for a, b in zip(c.results, ref.results, strict=True))
        print(f"| {c.server} | {c.p50():.1f} | {c.ips():.1f} | {p50:.2f} | {ips:.2f} |")


if __name__ == "__main__":
    main()
