"""The hook engine: batching, multiple targets, hooks' lifecycle, what is (not) differentiated."""

from __future__ import annotations

import gc

import pytest
import torch
import torchvision

from service.cam import CamEngine, CamQuery, find_layers
from service.cam.layers import Layout, to_nchw
from service.errors import InvalidArgument


def _images(n: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam"])
def test_batch_equals_one_at_a_time(tiny, method):
    x = _images(4)
    queries = [CamQuery(method=method, classes=(i % 10,)) for i in range(4)]
    with CamEngine(tiny, x[:1]) as engine:
        batched = engine.explain(x, queries)
        for i in range(4):
            single = engine.explain(x[i : i + 1], [queries[i]])
            torch.testing.assert_close(batched.cams[i].maps, single.cams[0].maps, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batched.logits[i], single.logits[0], atol=1e-5, rtol=1e-4)


def test_k_targets_equal_k_separate_calls(tiny):
    x = _images(2)
    with CamEngine(tiny, x[:1]) as engine:
        together = engine.explain(x, [CamQuery(classes=(1, 4, 7)), CamQuery(classes=(2, 3, 5))])
        for i, classes in enumerate([(1, 4, 7), (2, 3, 5)]):
            for t, c in enumerate(classes):
                alone = engine.explain(x[i : i + 1], [CamQuery(classes=(c,))])
                torch.testing.assert_close(together.cams[i].maps[t], alone.cams[0].maps[0], atol=1e-5, rtol=1e-4)
    assert together.cams[0].classes == (1, 4, 7)


def test_k_targets_use_one_forward(tiny):
    calls = []
    handle = tiny.register_forward_hook(lambda *a: calls.append(1))
    with CamEngine(tiny, _images(1)) as engine:
        calls.clear()
        engine.explain(_images(3), [CamQuery(top=5)] * 3)
    handle.remove()
    assert len(calls) == 1


def test_top_targets_follow_the_scores(tiny):
    x = _images(1)
    with CamEngine(tiny, x) as engine:
        out = engine.explain(x, [CamQuery(top=3)])
    assert list(out.cams[0].classes) == out.logits[0].topk(3).indices.tolist()


def test_mixed_batch_predict_and_explain(tiny):
    x = _images(3)
    with CamEngine(tiny, x[:1]) as engine:
        out = engine.explain(x, [None, CamQuery(method="layercam"), None])
        assert out.cams[0] is None and out.cams[2] is None and out.cams[1] is not None
        torch.testing.assert_close(out.logits, engine.predict(x), atol=1e-5, rtol=1e-4)


def test_different_layers_share_one_forward_and_match_separate_calls(tiny):
    x = _images(2)
    with CamEngine(tiny, x[:1]) as engine:
        mixed = engine.explain(x, [CamQuery(layer="features.1"), CamQuery(layer="features")])
        a = engine.explain(x[:1], [CamQuery(layer="features.1")])
        b = engine.explain(x[1:], [CamQuery(layer="features")])
    assert mixed.cams[0].maps.shape[-1] == 32 and mixed.cams[1].maps.shape[-1] == 16
    torch.testing.assert_close(mixed.cams[0].maps, a.cams[0].maps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed.cams[1].maps, b.cams[0].maps, atol=1e-5, rtol=1e-4)


def test_gradcam_is_relu_of_activation_gradient_weighted_sum(tiny):
    """Against a hand computation with plain autograd on the layer's activations."""
    x = _images(1)
    for p in tiny.parameters():
        p.requires_grad_(False)
    x.requires_grad_(True)
    acts = {}
    # The clone keeps `a` intact under the model's in-place ReLU.
    h = tiny.features.register_forward_hook(lambda m, i, o: acts.setdefault("a", o).clone())
    logits = tiny(x)
    h.remove()
    a = acts["a"]
    (g,) = torch.autograd.grad(logits[0, 3], a)
    expected = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))[0].detach()
    x = x.detach()
    with CamEngine(tiny, x) as engine:
        out = engine.explain(x, [CamQuery(classes=(3,))]).cams[0]
    torch.testing.assert_close(out.maps[0] * out.raw_max[0], expected, atol=1e-5, rtol=1e-4)


def test_no_parameter_or_input_gradients(tiny):
    x = _images(2)
    with CamEngine(tiny, x[:1]) as engine:
        engine.explain(x, [CamQuery(top=2)] * 2)
    assert all(p.grad is None and not p.requires_grad for p in tiny.parameters())
    assert x.grad is None and not x.requires_grad


def test_maps_are_normalised_and_empty_maps_stay_zero(tiny):
    x = _images(2)
    with CamEngine(tiny, x[:1]) as engine:
        out = engine.explain(x, [CamQuery(top=10)] * 2)
    for cam in out.cams:
        assert cam.maps.dtype == torch.float32
        assert cam.maps.min() >= 0 and cam.maps.max() <= 1
        for t in range(10):
            peak = cam.maps[t].max()
            assert (peak == 0) if cam.raw_max[t] == 0 else torch.isclose(peak, torch.tensor(1.0))


def test_zero_map_is_not_stretched(tiny):
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        tiny.head.weight.zero_()  # every class logit is constant: zero gradient everywhere
    with CamEngine(tiny, x) as engine:
        cam = engine.explain(x, [CamQuery(classes=(0,))]).cams[0]
    assert cam.raw_max[0] == 0 and cam.maps.abs().sum() == 0


def test_hooks_removed_on_close_and_after_an_exception(tiny):
    x = _images(1)
    before = _hook_count(tiny)
    with pytest.raises(InvalidArgument), CamEngine(tiny, x) as engine:
        engine.register("features.0")
        assert _hook_count(tiny) > before
        assert set(engine.hooked_layers) == {"features", "features.0"}
        engine.explain(x, [CamQuery(classes=(99,))])
    assert _hook_count(tiny) == before and engine.hooked_layers == ()


def test_a_failed_pass_leaves_no_capture_armed(tiny):
    """After an exception mid-pass, the model's own forwards record no graph, and the engine still works."""
    x = _images(2)
    with CamEngine(tiny, x[:1]) as engine:
        expected = engine.explain(x, [CamQuery(classes=(1,))] * 2)
        with pytest.raises(InvalidArgument):
            engine.explain(x, [CamQuery(classes=(1,)), CamQuery(classes=(99,))])
        with torch.enable_grad():
            assert not tiny(x).requires_grad
        again = engine.explain(x, [CamQuery(classes=(1,))] * 2)
    torch.testing.assert_close(again.cams[1].maps, expected.cams[1].maps)


def test_unknown_layer_lists_candidates(tiny):
    with CamEngine(tiny, _images(1)) as engine, pytest.raises(InvalidArgument, match=r"features\.1") as err:
        engine.explain(_images(1), [CamQuery(layer="nope")])
    assert "'nope'" in str(err.value)


def test_nothing_retained_and_memory_flat(tiny):
    x = _images(4)
    with CamEngine(tiny, x[:1]) as engine:
        for _ in range(5):
            engine.explain(x, [CamQuery(top=3)] * 4)
        gc.collect()
        baseline = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
        for _ in range(30):
            engine.explain(x, [CamQuery(top=3)] * 4)
        gc.collect()
        after = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
        with torch.enable_grad():
            assert not tiny(x).requires_grad  # no capture outside a pass
    assert after - baseline <= 2


@pytest.mark.parametrize(("name", "layer"), [
    ("resnet18", "layer4"), ("densenet121", "features"), ("vgg11", "features"),
    ("mobilenet_v3_small", "features"), ("efficientnet_b0", "features"), ("convnext_tiny", "features"),
])
def test_default_layers(name, layer):
    model = getattr(torchvision.models, name)(num_classes=4).eval()
    assert find_layers(model, torch.zeros(1, 3, 64, 64)).default == layer


def test_vision_transformer_tokens_fold_to_the_patch_grid():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(num_classes=5, image_size=64).eval()
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    # The class token is dropped and the 16 patch tokens become a 4x4 grid.
    assert to_nchw(torch.zeros(2, 17, 8), Layout("tokens", (4, 4), 8, prefix=1)).shape == (2, 8, 4, 4)
    x = _images(2, 64)
    with CamEngine(model, x[:1]) as engine:
        assert engine.layers.default == "encoder.layers.encoder_layer_11.ln_1"
        out = engine.explain(x, [CamQuery(top=2)] * 2)
    assert out.cams[0].maps.shape == (2, 4, 4)
    assert all(c.raw_max.max() > 0 for c in out.cams)


def test_densenet_inplace_relu_after_target_layer():
    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=3).eval()
    x = _images(1, 64)
    with CamEngine(model, x) as engine:
        cam = engine.explain(x, [CamQuery(classes=(0, 1, 2))]).cams[0]
    assert cam.layer == "features" and torch.isfinite(cam.maps).all()


def test_a_layer_asked_for_once_does_not_slow_later_passes(tiny, monkeypatch):
    """Hooks stay registered, but only the layers of the current pass capture and get gradients."""
    x = _images(2)
    wrt_shapes = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        wrt_shapes.append([tuple(t.shape) for t in inputs])
        return real_grad(outputs, inputs, *args, **kwargs)

    with CamEngine(tiny, x[:1]) as engine:
        engine.explain(x, [CamQuery(layer="features.0")] * 2)
        assert set(engine.hooked_layers) == {"features", "features.0"}
        monkeypatch.setattr(torch.autograd, "grad", spy)
        engine.explain(x, [CamQuery()] * 2)
    assert wrt_shapes == [[(2, 16, 16, 16)]]  # only `features`, not the 32x32 `features.0`
