"""Which threads run torch's parallel ops: each model's own thread, and no other.

On Linux torch parallelises CPU ops with libgomp, which gives every thread that starts a parallel region a
team of worker threads of its own, kept until that thread exits. Idle workers spin for a while (about
3 ms, ``GOMP_SPINCOUNT``) before they sleep, so consecutive ops of one forward find them awake; but they
spin only while the process has no more such threads than cores, and otherwise wait 100 spins and sleep.
A server that decodes in a pool of threads and runs the model in another has several teams: on two cores
every forward then pays a wake-up per op, and a lone resnet18 forward took 29 ms instead of 20 (measured
with ``python -m tests.bench.bench_openmp``). So each model's thread is the only one with a team: the
decode and render pools and the threads a load uses run torch ops on one thread (small ops, where a team
gains little), and all of a model's torch work from its load to its unload happens in its own thread.

The environment still decides how the team waits (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``,
``OMP_NUM_THREADS``); camserve sets none of them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch


def _omp_set_num_threads() -> Callable[[ctypes.c_int], object] | None:
    """libgomp's (or libomp's) per-thread setter, as loaded by torch; ``None`` where torch has no OpenMP."""
    try:
        setter: Callable[[ctypes.c_int], object] = ctypes.CDLL(None).omp_set_num_threads
        return setter
    except (AttributeError, OSError):
        return None


_SETTER = _omp_set_num_threads()


def confine() -> None:
    """Run the calling thread's torch ops on one thread, so that it never starts an OpenMP team.

    ``torch.set_num_threads`` would not do: it also sets the count for threads yet to come and MKL's
    count for the whole process. OpenMP's own setter applies to the calling thread only; torch reads it
    back (``omp_get_max_threads``) once it has set up the thread, which ``torch.get_num_threads`` does."""
    torch.get_num_threads()
    if _SETTER is not None:
        _SETTER(ctypes.c_int(1))


@contextmanager
def one_thread() -> Iterator[None]:
    """The calling thread's torch ops on one thread for a while: small decodes and renders on the event loop,
    whose thread is not camserve's to confine for good (a notebook's, a test's)."""
    n = torch.get_num_threads()
    if _SETTER is None or n == 1:
        yield
        return
    _SETTER(ctypes.c_int(1))
    try:
        yield
    finally:
        _SETTER(ctypes.c_int(n))


def confined_pool(workers: int, prefix: str) -> ThreadPoolExecutor:
    """A pool for decoding, encoding and rendering: its threads never start an OpenMP team."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix, initializer=confine)


def model_thread(name: str) -> ThreadPoolExecutor:
    """The one thread that runs a model's torch work, load and warm-up included: the only one with a team."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"camserve-{name}")
