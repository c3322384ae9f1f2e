"""One OpenMP team per model: the decode and render pools never start one, a model's thread does.

Counted, not timed: every thread that starts a parallel region gets ``torch.get_num_threads() - 1``
OpenMP workers, native threads that Python's ``threading`` does not list, kept while that thread lives."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.modelspec import ModelSpec
from service.threads import confine, confined_pool, one_thread
from tests.api.conftest import b64, png_bytes

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                                reason="counts threads through /proc with torch on 2 or more threads")


def _native_threads() -> int:
    """Once settled: the workers of a thread that ended leave a moment after it."""
    last, deadline = -1, time.monotonic() + 5
    while time.monotonic() < deadline:
        now = len(os.listdir("/proc/self/task")) - threading.active_count()
        if now == last:
            return now
        last = now
        time.sleep(0.1)
    return last


def _parallel_op() -> None:
    torch.randn(4, 512, 512).mul_(2).add_(1).sum()


def _workers_kept_by(setup: Callable[[], object], then_parallel_op: bool = True) -> int:
    """Native threads a live thread keeps after ``setup`` (and a parallel op) in it."""
    ran, hold = threading.Event(), threading.Event()

    def body() -> None:
        setup()
        if then_parallel_op:
            _parallel_op()
        ran.set()
        hold.wait(30)

    before = _native_threads()
    t = threading.Thread(target=body, daemon=True)
    t.start()
    ran.wait(30)
    try:
        return _native_threads() - before
    finally:
        hold.set()
        t.join(30)


def test_a_confined_thread_starts_no_team():
    assert _workers_kept_by(lambda: None) == torch.get_num_threads() - 1
    assert _workers_kept_by(confine) == 0


def test_a_confined_pool_runs_torch_on_one_thread():
    with confined_pool(2, "t") as pool:
        assert set(pool.map(lambda _: torch.get_num_threads(), range(8))) == {1}
    assert torch.get_num_threads() > 1  # the caller's own count is left alone


def test_one_thread_for_a_while():
    n = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
    assert _workers_kept_by(lambda: None) == n - 1
    with pytest.raises(RuntimeError), one_thread():
        raise RuntimeError
    assert torch.get_num_threads() == n


def test_a_serving_model_has_the_only_team():
    """Load, warm-up, decodes in the pool, batches and lone requests: one team in all, the model's."""
    before = _native_threads()
    spec = ModelSpec.from_table("shapes", {"source": "builtin:shapes"})
    # 300x300 uploads decode in the pool; 120x120 ones (and their renders) on the event loop.
    images = [b64(png_bytes(np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)))
              for i, size in enumerate((300, 300, 120, 120))]
    with TestClient(create_app(Settings(models=(spec,)))) as c:
        for path in ("/predict", "/explain"):
            assert c.post(path, json={"model": "shapes", "images": images}).status_code == 200
            for image in (images[0], images[2]):
                assert c.post(path, json={"model": "shapes", "image": image}).status_code == 200
        assert _native_threads() - before <= torch.get_num_threads() - 1


def test_camserve_serve_loads_models_without_leaving_a_team_in_the_main_thread():
    """`camserve serve` loads before the port opens; the event loop's thread must not keep a team from it.
    In a fresh process, since it confines its caller."""
    code = (
        "import os, threading\n"
        "from service.cli import load_models\n"
        "from service.modelspec import ModelSpec\n"
        "from tests.test_threads import _native_threads, _parallel_op\n"
        "before = _native_threads()\n"
        "load_models([ModelSpec.from_table('r', {'source': 'torchvision:resnet18', 'weights': 'none'})])\n"
        "_parallel_op()\n"
        "print(_native_threads() - before)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.split()[-1] == "0", out.stdout + out.stderr
