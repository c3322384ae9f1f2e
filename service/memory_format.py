"""Which memory format a model's convolutions run fastest in, per batch size, measured when it loads.

channels_last (NHWC) is not always faster: on a 2-core CPU resnet18 ran about 8% slower channels_last at
batch 1 and faster at batch 8, and a model without convolutions does not care. So the choice is measured,
not assumed. PyTorch runs a convolution channels_last when its input *or* its weight is channels_last, so
there are three ways to run a batch:

- weights and inputs channels_last;
- weights and inputs contiguous (NCHW);
- weights contiguous, inputs channels_last (the weights are reordered at each call, which costs a little).

One weight format serves the model (a second copy would double its memory); with contiguous weights the
input format is still chosen per batch size. The plan keeps the weight format whose best times, each
relative to the fastest way measured at that batch size, sum lowest (channels_last on a tie within
``margin``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

CHANNELS_LAST = torch.channels_last
CONTIGUOUS = torch.contiguous_format
_NAMES = {CHANNELS_LAST: "channels_last", CONTIGUOUS: "contiguous"}
# A first forward shorter than this that shows the measurement too slow is timed again, warm.
_SECOND_LOOK_S = 1.0


@dataclass(frozen=True)
class FormatPlan:
    """``weights``: the format the model's weights are kept in; ``inputs``: ``(from_batch_size, format)``
    ascending, the input format from that batch size on; ``timings_ms``: what was measured."""

    weights: torch.memory_format = CHANNELS_LAST
    inputs: tuple[tuple[int, torch.memory_format], ...] = ((1, CHANNELS_LAST),)
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Seconds per image of the chosen way at the largest size measured (or of the one forward that showed
    # the measurement too slow): what an extra forward of a perturbation method costs. None: not timed.
    forward_s: float | None = None

    def input_format(self, batch: int) -> torch.memory_format:
        chosen = self.inputs[0][1]
        for start, fmt in self.inputs:
            if batch >= start:
                chosen = fmt
        return chosen

    def describe(self) -> str:
        inputs = ", ".join(f"from {n}: {_NAMES[f]}" for n, f in self.inputs)
        return f"weights {_NAMES[self.weights]}, inputs {inputs}"


def has_convolutions(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in module.modules())


def measure(module: nn.Module, forward: Callable[[Tensor], object], example: Tensor, sizes: Sequence[int],
            reps: int = 3, sync: Callable[[], None] = lambda: None,
            clock: Callable[[], float] = time.perf_counter, margin: float = 0.03,
            budget_s: float = 15.0) -> FormatPlan:
    """Time ``forward`` on ``example`` ``(1, 3, H, W)`` repeated to each batch size of ``sizes``, each way of
    running it, in rounds that visit every way once (so a drift of a shared machine touches them all alike;
    medians of ``reps`` rounds), and leave ``module``'s weights in the chosen format. A model without
    convolutions stays contiguous. When a warm forward (the first, or a second one if the first was quick)
    shows that the whole measurement would take more than ``budget_s``, the model stays channels_last
    unmeasured: a load must not take minutes for this."""
    if not has_convolutions(module):
        module.to(memory_format=CONTIGUOUS)
        return FormatPlan(CONTIGUOUS, ((1, CONTIGUOUS),))
    ways = {CHANNELS_LAST: (CHANNELS_LAST,), CONTIGUOUS: (CONTIGUOUS, CHANNELS_LAST)}  # weights -> inputs
    sizes = sorted(set(sizes))
    module.to(memory_format=CHANNELS_LAST)
    lone = example.contiguous(memory_format=CHANNELS_LAST)

    def timed() -> float:
        sync()
        t0 = clock()
        forward(lone)
        sync()
        return clock() - t0

    # Every way at every size, reps + 1 rounds; a batch of n costs at most about n lone images.
    rounds = (reps + 1) * sum(len(v) for v in ways.values()) * sum(sizes)
    first = timed()
    if first * rounds > budget_s and first < _SECOND_LOOK_S:
        # A first forward pays one-off costs (kernel selection, allocations) several times its own: resnet18's
        # took 0.1-0.6 s against 25 ms warm, which alone would leave it unmeasured. A second one says more.
        first = min(first, timed())
    estimate = first * rounds
    if estimate > budget_s:
        return FormatPlan(CHANNELS_LAST, ((1, CHANNELS_LAST),), {"unmeasured, estimated s": round(estimate, 1)},
                          first)
    batches = {(n, fmt): example.expand(n, *example.shape[1:]).contiguous(memory_format=fmt)
               for n in sizes for fmt in (CHANNELS_LAST, CONTIGUOUS)}
    times: dict[tuple[torch.memory_format, torch.memory_format, int], list[float]] = {}
    weight_order = list(ways)
    # Round 0 warms every way up (the first call of a shape selects kernels) and is not counted. Each round
    # visits every way once, the weight formats in turn (a conversion per round, outside the timing).
    for r in range(reps + 1):
        for weights in weight_order[r % 2:] + weight_order[: r % 2]:
            module.to(memory_format=weights)
            for n in sizes:
                for fmt in ways[weights]:
                    sync()
                    t0 = clock()
                    forward(batches[(n, fmt)])
                    sync()
                    if r:
                        times.setdefault((weights, fmt, n), []).append((clock() - t0) * 1000)
    ms = {key: statistics.median(v) for key, v in times.items()}
    best_at = {n: min(v for (_, _, m), v in ms.items() if m == n) for n in sizes}
    plans = {}
    for weights in (CHANNELS_LAST, CONTIGUOUS):
        per_size = {n: min((v, fmt) for (w, fmt, m), v in ms.items() if w == weights and m == n) for n in sizes}
        score = sum(per_size[n][0] / best_at[n] for n in sizes)
        steps: list[tuple[int, torch.memory_format]] = []
        for i, n in enumerate(sizes):
            fmt = per_size[n][1]
            if not steps or steps[-1][1] != fmt:
                # From the geometric midpoint between two measured sizes, the larger one's choice holds.
                start = 1 if i == 0 else max(2, round((sizes[i - 1] * n) ** 0.5))
                steps.append((start, fmt))
        plans[weights] = (score, tuple(steps))
    # channels_last, the format models are loaded in, stays unless contiguous wins by a margin: on a busy
    # machine a few timings can be off by more than the difference being measured.
    weights = CONTIGUOUS if plans[CONTIGUOUS][0] < plans[CHANNELS_LAST][0] * (1 - margin) else CHANNELS_LAST
    module.to(memory_format=weights)
    timings = {f"weights {_NAMES[w]}, inputs {_NAMES[f]}, batch {n}": round(v, 3) for (w, f, n), v in ms.items()}
    largest = sizes[-1]
    per_image = min(v for (w, _, n), v in ms.items() if w == weights and n == largest) / 1000 / largest
    return FormatPlan(weights, plans[weights][1], timings, per_image)
