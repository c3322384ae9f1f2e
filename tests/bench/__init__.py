"""Benchmarks (`make bench` and friends): their files are named bench_*, so pytest does not collect them."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The processor's model name (``AMD EPYC``, ``Intel Xeon ...``), else the architecture: the hosts behind these
    2-core machines change between sessions, and a ratio measured on one need not hold on another."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()
