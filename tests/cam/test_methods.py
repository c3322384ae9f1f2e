"""The method table and the perturbation methods' definitions, checked by brute force."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.cam import METHODS, CamEngine, CamMethod, CamQuery, Cost, get_method, register_method
from service.cam.engine import check_extra_forwards
from service.errors import InvalidArgument
from service.models.shapes import ShapesNet


def _images(n: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_table_lists_every_method_with_a_cost_class():
    assert list(METHODS)[:6] == ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "gradcam-elementwise"]
    assert {"eigengradcam", "eigencam", "scorecam", "ablationcam", "guided-gradcam"} <= set(METHODS)
    assert METHODS["scorecam"].cost is Cost.FORWARDS and METHODS["ablationcam"].cost is Cost.REPLAY
    assert METHODS["gradcam"].cost is Cost.FREE and METHODS["guided-gradcam"].cost is Cost.BACKWARD


def test_register_refuses_a_name_twice():
    with pytest.raises(ValueError, match="'gradcam' is already registered"):
        @register_method
        class Again(CamMethod):
            name = "gradcam"
    with pytest.raises(InvalidArgument, match=r"`method` must be one of gradcam, .*got 'nope'"):
        get_method("nope")


def _brute_force_ablation(model, layer, x, c):
    """AblationCAM by its definition: a full forward per zeroed channel."""
    module = dict(model.named_modules())[layer]
    acts = {}

    def keep(m, i, o):
        acts["a"] = o.clone()  # returns None: the model goes on with `o`, whose in-place ReLU must not reach the copy

    h = module.register_forward_hook(keep)
    with torch.no_grad():
        y = model(x)[0, c]
    h.remove()
    a = acts["a"]
    weights = []
    for k in range(a.shape[1]):
        def zero(m, i, o, k=k):
            o = o.clone()
            o[:, k] = 0
            return o
        h = module.register_forward_hook(zero)
        with torch.no_grad():
            weights.append((y - model(x)[0, c]) / y)
        h.remove()
    w = torch.stack(weights)
    cam = torch.relu((w[:, None, None] * a[0]).sum(0))
    return cam / cam.max()


class _Untraceable(nn.Module):
    """A data-dependent branch after the target layer: torch.fx cannot cut the tail, so whole forwards run."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        f = self.inner.features(x)
        if bool(f.abs().sum() >= 0):
            f = torch.relu(f)
        return self.inner.head(f.mean(dim=(2, 3)))


@pytest.mark.parametrize("kind", ["closed-form", "tail", "whole-forward"])
def test_ablationcam_equals_its_definition(tiny, kind):
    torch.manual_seed(0)
    model = {"closed-form": ShapesNet().eval(), "tail": tiny, "whole-forward": _Untraceable(tiny).eval()}[kind]
    x = _images(1, 64 if kind == "closed-form" else 32)
    layer = "inner.features" if kind == "whole-forward" else "features"
    with CamEngine(model, x, chunk_rows=5) as engine:
        top = int(engine.predict(x)[0].argmax())
        cam = engine.explain(x, [CamQuery(method="ablationcam", layer=layer, classes=(top,))]).cams[0]
        job = engine.begin(x, [CamQuery(method="ablationcam", layer=layer, classes=(top,))])
        chunks = 0
        while job.step():
            chunks += 1
        assert engine.extra_forwards(CamQuery(method="ablationcam", layer=layer)) == (
            0 if kind == "closed-form" else 17)  # 16 channels and the base
    for p in model.parameters():
        p.requires_grad_(True)
    expected = _brute_force_ablation(model, layer, x, top)
    torch.testing.assert_close(cam.maps[0], expected, atol=1e-4, rtol=1e-3)
    # The closed form needs no chunk; a tail replays all 17 small activations at once; whole forwards go 5 at a time.
    assert chunks == {"closed-form": 0, "tail": 1, "whole-forward": 4}[kind]


def test_scorecam_chunks_are_bounded_and_shared_by_targets(tiny):
    x = _images(2)
    sizes = []
    with CamEngine(tiny, x[:1], chunk_rows=7) as engine:
        handle = tiny.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
        job = engine.begin(x, [CamQuery(method="scorecam", classes=(1, 2, 3))] * 2)
        sizes.clear()
        while job.step():
            pass
        handle.remove()
        out = job.result()
    assert max(sizes) <= 7 and sum(sizes) == 2 * 16  # one masked forward per channel and image, for all 3 targets
    assert out.cams[0].maps.shape == (3, 16, 16)


class _HalfDead(nn.Module):
    """``tiny`` with a ReLU ending its features, and half of those channels dead (constant zero)."""

    def __init__(self, inner):
        super().__init__()
        self.features = nn.Sequential(*inner.features, nn.ReLU())
        self.head = inner.head
        with torch.no_grad():
            self.features[4].bias[:8] = -1e3

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def _brute_force_scorecam(model, x, c):
    """ScoreCAM by its definition: a full forward per channel's mask, dead or not."""
    with torch.no_grad():
        a = model.features(x)
        up = torch.nn.functional.interpolate(a.transpose(0, 1), size=x.shape[-2:], mode="bilinear",
                                             align_corners=True)  # (C, 1, H, W)
        lo, hi = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
        scores = torch.stack([model(x * m[None])[0, c] for m in (up - lo) / (hi - lo + 1e-8)])
        cam = torch.relu((scores.softmax(0)[:, None, None] * a[0]).sum(0))
    return cam / cam.max()


def test_scorecam_runs_one_forward_for_all_dead_channels_and_equals_its_definition(tiny):
    model = _HalfDead(tiny).eval()
    x = _images(2)
    sizes = []
    with CamEngine(model, x[:1], chunk_rows=5) as engine:
        top = [int(engine.predict(x[i : i + 1])[0].argmax()) for i in range(2)]
        handle = model.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
        job = engine.begin(x, [CamQuery(method="scorecam", layer="features", classes=(t,)) for t in top])
        sizes.clear()
        while job.step():
            pass
        handle.remove()
        out = job.result()
    assert sum(sizes) == 2 * 8 + 1  # the 8 live channels of each image, and one zero input for all 16 dead ones
    for i in range(2):
        torch.testing.assert_close(out.cams[i].maps[0], _brute_force_scorecam(model, x[i : i + 1], top[i]),
                                   atol=1e-4, rtol=1e-3)


def test_cancel_stops_the_remaining_chunks(tiny):
    x = _images(1)
    calls = []
    with CamEngine(tiny, x, chunk_rows=4) as engine:
        job = engine.begin(x, [CamQuery(method="scorecam")])
        handle = tiny.register_forward_hook(lambda *a: calls.append(1))
        job.step()
        job.cancel()
        assert not job.step()
        handle.remove()
        with pytest.raises(RuntimeError, match="cancelled"):
            job.result()
    assert len(calls) == 1


def test_budget_is_refused_with_cost_and_limit(tiny):
    with CamEngine(tiny, _images(1)) as engine:
        cost = engine.extra_forwards(CamQuery(method="scorecam", smooth="aug"))
    assert cost == 16 * 6
    check_extra_forwards(cost, 1.0, 96)
    with pytest.raises(InvalidArgument, match="needs 96 extra forward images, over the limit of 95"):
        check_extra_forwards(cost, 1.0, 95)


def test_guided_gradcam_needs_relu_modules_and_leaves_the_model_alone(tiny):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))

    x = _images(1)
    with CamEngine(Functional().eval(), x) as engine, pytest.raises(InvalidArgument, match=r"nn\.ReLU"):
        engine.explain(x, [CamQuery(method="guided-gradcam")])
    before = [type(m) for m in tiny.modules()]
    hooks = sum(len(m._forward_hooks) for m in tiny.modules())
    with CamEngine(tiny, x) as engine:
        hooks = sum(len(m._forward_hooks) for m in tiny.modules())
        plain = engine.explain(x, [None, CamQuery(classes=(1,))][1:])
        guided = engine.explain(x, [CamQuery(method="guided-gradcam", classes=(1,))])
        after = engine.explain(x, [CamQuery(classes=(1,))])
        assert sum(len(m._forward_hooks) for m in tiny.modules()) == hooks
    assert [type(m) for m in tiny.modules()] == before
    assert guided.cams[0].maps.shape == (1, 32, 32)
    torch.testing.assert_close(plain.cams[0].maps, after.cams[0].maps)


def test_fusion_and_smoothing_options(tiny):
    x = _images(1)
    with CamEngine(tiny, x) as engine:
        one = engine.explain(x, [CamQuery(layer="features", classes=(2,))]).cams[0]
        maxed = engine.explain(x, [CamQuery(layer=("features", "features"), fuse="max", classes=(2,))]).cams[0]
        fused = engine.explain(x, [CamQuery(layer=("features", "features.1"), fuse="product", classes=(2,))]).cams[0]
        with pytest.raises(InvalidArgument, match="`fuse` must be one of mean, max, product, got 'sum'"):
            engine.explain(x, [CamQuery(layer=("features", "features.1"), fuse="sum")])
        with pytest.raises(InvalidArgument, match="`smooth` must be one of aug, eigen, got 'x'"):
            engine.explain(x, [CamQuery(smooth="x")])
    torch.testing.assert_close(maxed.maps, one.maps)  # a layer named twice is one layer
    assert fused.layer == "features+features.1" and fused.maps.shape == (1, 32, 32)
    assert fused.maps.max() == pytest.approx(1.0)
