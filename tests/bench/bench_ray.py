"""Ray Serve benchmark (``make bench-ray``): what Serve's proxy costs against a plain server.

The same load (``bench_http.load``: a raw-socket keep-alive client replaying one multipart request)
against a plain ``camserve serve`` process and against Serve with one replica (all the machine's
CPUs) and with two (half each), on a model-bound resnet18 (random weights, 224x224) and the
overhead-bound built-in shapes model. The three servers run side by side (Serve's two applications
under route prefixes) so the variants interleave: each round measures every cell once, and the table
quotes the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from service.config import load_settings
from service.models.scenes import make_scene
from tests.api.server import free_port, start_server
from tests.bench.bench_http import _png, load

PATHS = ("/predict", "/explain")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=160, help="requests per shapes cell")
    parser.add_argument("--resnet-requests", type=int, default=48, help="requests per resnet18 cell")
    parser.add_argument("--models", default="resnet18,shapes")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers (proxy, replicas) at nice 15 so its control plane stays responsive. On a
    # machine shared with other work that alone would starve them against the plain server at nice 0.
    os.environ.setdefault("RAY_worker_niceness", "0")

    import ray
    from ray import serve

    from service.rayserve import ReplicaOptions, build, deploy

    cpus = os.cpu_count() or 2
    rng = np.random.default_rng(0)
    shapes_png = _png(make_scene(rng).image)
    photo = _png(np.asarray(Image.fromarray(make_scene(rng).image).resize((256, 256), Image.BILINEAR)), "JPEG")
    tmp = Path(tempfile.mkdtemp())
    configs = {"resnet18": (tmp / "r18.toml", photo, args.resnet_requests),
               "shapes": (tmp / "shapes.toml", shapes_png, args.requests)}
    configs["resnet18"][0].write_text('[models.r18]\nsource = "torchvision:resnet18"\nweights = "none"\n')
    configs["shapes"][0].write_text('[models.shapes]\nsource = "builtin:shapes"\n')

    # Logical CPUs for both Serve applications at once; each replica's threads follow its own
    # num_cpus (all cores for the single replica, half each for the pair), not this number.
    ray.init(num_cpus=2 * cpus, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False,
             logging_level="warning")
    proxy = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": proxy})
    print(f"# Ray Serve benchmark on {platform.machine()}, {cpus} cores, CPU; concurrency {args.concurrency}, "
          f"median of {args.rounds} interleaved rounds; load generator on the same machine")
    print("| model | endpoint | server | p50 ms | p95 ms | images/s | vs plain |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    try:
        for model in args.models.split(","):
            config, image, n = configs[model]
            settings = load_settings(config)
            plain_port = free_port()
            plain = start_server(plain_port, {"SERVICE_LOG_LEVEL": "warning"}, config)
            # Access logs off in the replicas too: the plain server runs with warnings only.
            quiet = {"enable_access_log": False, "log_level": "WARNING"}
            try:
                deploy(build(settings, ReplicaOptions(replicas=1, num_cpus=cpus)), name="one", route_prefix="/one",
                       logging_config=quiet, timeout_s=300)
                deploy(build(settings, ReplicaOptions(replicas=2, num_cpus=cpus / 2)), name="two",
                       route_prefix="/two", logging_config=quiet, timeout_s=300)
                servers = {"plain": (plain_port, ""), "serve 1 replica": (proxy, "/one"),
                           "serve 2 replicas": (proxy, "/two")}
                cells: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
                for _ in range(args.rounds):
                    for path in PATHS:
                        for name, (port, prefix) in servers.items():
                            result = asyncio.run(load(port, prefix + path, image, args.concurrency, n))
                            cells.setdefault((path, name), []).append(result)
                for path in PATHS:
                    base = statistics.median(r[2] for r in cells[(path, "plain")])
                    for name in servers:
                        runs = cells[(path, name)]
                        p50, p95, ips = (statistics.median(r[i] for r in runs) for i in range(3))
                        print(f"| {model} | {path} | {name} | {p50:.1f} | {p95:.1f} | {ips:.1f} | {ips / base:.2f}x |",
                              flush=True)
                        summary.append((model, path, name, ips / base))
            finally:
                plain.terminate()
                plain.wait(30)
                for app in ("one", "two"):
                    serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()
    print()
    for model, path, name, ratio in summary:
        if model == "resnet18" and name == "serve 1 replica":
            verdict = "meets" if ratio >= 0.7 else "misses"
            print(f"- resnet18 {path} at concurrency {args.concurrency}: Serve with one replica runs at {ratio:.2f}x "
                  f"a plain server's throughput ({verdict} the 0.7x target)")


if __name__ == "__main__":
    main()
