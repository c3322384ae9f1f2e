"""How OpenMP's idle wait shapes a lone resnet18 forward (batch 1, a 10 ms pause before each, as requests at
concurrency 1 meet it), with one OpenMP team in the process (a plain model server: every op in one thread)
and with two (camserve: decoding and the model run in different threads, each with a team).

    python -m tests.bench.bench_openmp --runs 2 --setting default= --setting passive=OMP_WAIT_POLICY=PASSIVE

Each setting runs in fresh processes (libgomp reads its environment once), alternating with the others run
by run. libgomp spins about 3 ms (``GOMP_SPINCOUNT`` 300000) before sleeping when it has no more threads
than cores, and only 100 spins when it has more: with two teams on two cores, the default behaves as
``PASSIVE`` does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time


def child(two_teams: bool, calls: int) -> None:
    import torch
    import torchvision

    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    if two_teams:  # another thread that ran a parallel op, alive: its team stays
        hold = threading.Event()

        def side() -> None:
            torch.randn(3, 512, 512).mul_(2).add_(1)
            hold.wait()

        threading.Thread(target=side, daemon=True).start()
        time.sleep(0.2)
    times = []
    for i in range(calls + 3):
        time.sleep(0.01)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(x)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
    print(statistics.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setting", action="append", required=True, help="NAME=K=V,K=V (none after NAME=)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--child", choices=["one", "two"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child == "two", args.calls)
        return
    settings = {}
    for text in args.setting:
        name, _, env = text.partition("=")
        settings[name] = dict(kv.split("=", 1) for kv in env.split(",") if kv)
    got: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.runs):
        for name, env in settings.items():
            for teams in ("one", "two"):
                out = subprocess.run([sys.executable, "-m", "tests.bench.bench_openmp", "--setting", "x=",
                                      "--child", teams, "--calls", str(args.calls)],
                                     env={**os.environ, **env}, capture_output=True, text=True, check=True)
                got.setdefault((name, teams), []).append(float(out.stdout))
    print(f"# resnet18 batch 1 after a 10 ms pause, ms (median of {args.calls} calls; runs: {args.runs}); "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| setting | one team | two teams |")
    print("|---|---|---|")
    for name in settings:
        one, two = (" / ".join(f"{v:.1f}" for v in got[(name, t)]) for t in ("one", "two"))
        print(f"| {name} | {one} | {two} |")


if __name__ == "__main__":
    main()
