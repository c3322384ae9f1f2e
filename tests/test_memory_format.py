"""The memory format is measured per model and batch size when a model loads, not assumed."""

from __future__ import annotations

import asyncio

import torch
from torch import nn

from service.memory_format import CHANNELS_LAST, CONTIGUOUS, FormatPlan, measure
from service.pipeline import Job, Pipeline
from service.repository import BatchSettings, ModelRepository
from tests.api.models import tiny_model


class Timed(nn.Module):
    """A convolution whose forward takes ``costs[(weights, input, batch)]`` milliseconds of a made-up clock."""

    def __init__(self, costs: dict[tuple[str, str, int], float], cold_ms: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)  # a 3x3 kernel: its two formats differ
        self.costs = costs
        self.cold_ms = cold_ms  # what the first forward costs on top
        self.now = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def fmt(t: torch.Tensor) -> str:
            return "cl" if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() else "nchw"

        self.now += (self.costs[(fmt(self.conv.weight), fmt(x), x.shape[0])] + self.cold_ms) / 1000
        self.cold_ms = 0.0
        return self.conv(x).mean(dim=(2, 3))


def _plan(costs):
    model = Timed(costs)
    return model, measure(model, model, torch.randn(1, 3, 8, 8), [1, 8], reps=3, clock=lambda: model.now)


def test_contiguous_for_a_lone_image_and_channels_last_inputs_for_a_batch():
    """The case measured on resnet18 on a 2-core CPU: NCHW wins at batch 1, NHWC at batch 8."""
    model, plan = _plan({("cl", "cl", 1): 12, ("nchw", "nchw", 1): 4, ("nchw", "cl", 1): 12,
                         ("cl", "cl", 8): 30, ("nchw", "nchw", 8): 60, ("nchw", "cl", 8): 34})
    assert plan.weights is CONTIGUOUS and model.conv.weight.is_contiguous()
    assert plan.inputs == ((1, CONTIGUOUS), (3, CHANNELS_LAST))
    assert [plan.input_format(n) for n in (1, 2, 3, 8, 64)] == [CONTIGUOUS] * 2 + [CHANNELS_LAST] * 3
    assert len(plan.timings_ms) == 6


def test_channels_last_throughout_when_it_wins_at_every_size():
    model, plan = _plan({("cl", "cl", 1): 4, ("nchw", "nchw", 1): 8, ("nchw", "cl", 1): 6,
                         ("cl", "cl", 8): 20, ("nchw", "nchw", 8): 40, ("nchw", "cl", 8): 30})
    assert plan.weights is CHANNELS_LAST and plan.inputs == ((1, CHANNELS_LAST),)
    assert not model.conv.weight.is_contiguous()


def test_a_model_too_slow_to_measure_stays_channels_last_after_one_forward():
    """A forward of 3 s (a large model on a small CPU) would make the measurement cost minutes of load."""
    costs = {("cl", "cl", 1): 3000, ("nchw", "nchw", 1): 1, ("nchw", "cl", 1): 1,
             ("cl", "cl", 8): 1, ("nchw", "nchw", 8): 1, ("nchw", "cl", 8): 1}
    model = Timed(costs)
    plan = measure(model, model, torch.randn(1, 3, 8, 8), [1, 8], reps=3, clock=lambda: model.now)
    assert plan.weights is CHANNELS_LAST and plan.inputs == ((1, CHANNELS_LAST),)
    assert model.now == 3.0  # one forward, then nothing more
    assert "unmeasured, estimated s" in plan.timings_ms


def test_a_slow_first_forward_is_timed_again_before_giving_up():
    """resnet18 on a busy 2-core CPU: 600 ms cold, 25 ms warm; the cold one alone estimates 65 s."""
    costs = {("cl", "cl", 1): 25, ("nchw", "nchw", 1): 20, ("nchw", "cl", 1): 25,
             ("cl", "cl", 8): 150, ("nchw", "nchw", 8): 200, ("nchw", "cl", 8): 160}
    model = Timed(costs, cold_ms=600)
    plan = measure(model, model, torch.randn(1, 3, 8, 8), [1, 8], reps=3, clock=lambda: model.now)
    assert "unmeasured, estimated s" not in plan.timings_ms and len(plan.timings_ms) == 6
    assert plan.inputs[0] == (1, CONTIGUOUS)


def test_a_model_without_convolutions_stays_contiguous():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    plan = measure(model, model, torch.randn(1, 3, 2, 2), [1, 8])
    assert plan.weights is CONTIGUOUS and plan.input_format(8) is CONTIGUOUS and not plan.timings_ms


def test_the_pipeline_feeds_each_batch_size_its_format():
    rt = Pipeline(tiny_model())
    assert rt.formats == FormatPlan()  # before measuring: channels_last, as loaded
    rt.formats = FormatPlan(CONTIGUOUS, ((1, CONTIGUOUS), (3, CHANNELS_LAST)))
    pixels = torch.zeros(3, 32, 32, dtype=torch.uint8)
    one, four = rt._inputs([Job(pixels, None)]), rt._inputs([Job(pixels, None)] * 4)
    assert one.is_contiguous() and not four.is_contiguous()
    assert four.is_contiguous(memory_format=torch.channels_last)


def test_a_model_is_measured_when_it_loads():
    async def go() -> FormatPlan:
        repository = ModelRepository(BatchSettings(max_batch_size=4))
        repository.start()
        entry = await repository.load(tiny_model())
        assert entry.pipeline is not None
        plan = entry.pipeline.formats
        await repository.close()
        return plan

    plan = asyncio.run(go())
    assert sorted({key.rsplit(" ", 1)[1] for key in plan.timings_ms}) == ["1", "4"]
