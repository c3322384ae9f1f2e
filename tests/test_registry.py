"""Loading models from every kind of source, offline: state_dict files stand in for downloads."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from service.cam import CamQuery
from service.config import ConfigError, Settings, load_settings
from service.errors import InvalidArgument
from service.registry import ModelLoadError, ModelSpec, load_model
from tests.api.models import Tiny


def test_torchvision_state_dict_file_with_labels(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    (tmp_path / "labels.json").write_text(json.dumps(["cat", "dog", "fox"]))
    m = load_model(ModelSpec("r18", "torchvision:resnet18", weights=str(tmp_path / "r18.pth"),
                             labels=str(tmp_path / "labels.json"), device="cpu",
                             preprocess={"resize": 160, "crop": 128}))
    assert m.labels == ["cat", "dog", "fox"]
    assert m.preprocess.input_size == (128, 128)
    assert m.engine.layers.default == "layer4"
    x = torch.randn(2, 3, 128, 128)
    torch.testing.assert_close(m.engine.predict(x), reference(x), atol=1e-4, rtol=1e-4)


def test_class_count_comes_from_the_state_dict(tmp_path):
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=7).state_dict(), tmp_path / "m.pt")
    m = load_model(ModelSpec("m", "torchvision:mobilenet_v3_small", weights=str(tmp_path / "m.pt"),
                             target_layer="features.9"))
    assert m.num_classes == 7
    assert m.labels[0] == "class_0"
    assert m.engine.layers.default == "features.9"


def test_torchvision_weights_name_reads_torch_home(tmp_path, monkeypatch):
    """A weights name loads from TORCH_HOME when the file is there, as after an online first run."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), cache / weights.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    m = load_model(ModelSpec("r18", "torchvision:resnet18", weights="IMAGENET1K_V1"))
    assert m.labels[:2] == ["tench", "goldfish"]
    assert m.num_classes == 1000
    assert m.preprocess.input_size == (224, 224)


def test_unknown_weights_name_lists_the_known_ones():
    with pytest.raises(ModelLoadError, match="IMAGENET1K_V1"):
        load_model(ModelSpec("r18", "torchvision:resnet18", weights="IMAGENET9K"))


def test_random_weights_are_allowed_with_a_warning(caplog):
    m = load_model(ModelSpec("r", "torchvision:resnet18", weights="none", preprocess={"resize": 64, "crop": 64}))
    assert m.num_classes == 1000
    assert "random initialisation" in caplog.text


def test_random_weights_are_the_same_in_every_process():
    """Seeded without touching the caller's generator: replicas of a random model answer alike."""
    spec = ModelSpec("r", "torchvision:resnet18", weights="none", preprocess={"resize": 64, "crop": 64})
    torch.manual_seed(123)
    a = load_model(spec)
    after_first = torch.rand(3)
    torch.manual_seed(456)
    b = load_model(spec)
    for (name, p), q in zip(a.engine.model.state_dict().items(), b.engine.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    torch.manual_seed(123)
    torch.testing.assert_close(torch.rand(3), after_first)


def test_python_factory_with_weights(tmp_path):
    torch.save(Tiny().state_dict(), tmp_path / "tiny.pt")
    m = load_model(ModelSpec("t", "python:tests.api.models:slow", weights=str(tmp_path / "tiny.pt"),
                             preprocess={"resize": [32, 32]}))
    assert m.num_classes == 4
    assert m.preprocess.input_size == (32, 32)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_torchscript_model(tmp_path):
    torch.manual_seed(0)
    eager = Tiny().eval()
    torch.jit.save(torch.jit.trace(eager, torch.randn(1, 3, 32, 32)), str(tmp_path / "tiny.pt"))
    m = load_model(ModelSpec("ts", f"torchscript:{tmp_path / 'tiny.pt'}", preprocess={"resize": [32, 32]}))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m.engine.predict(x), eager(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidArgument, match="TorchScript"):
        m.engine.explain(x, [CamQuery()] * 2)
    # /models says so: predictions only, and why.
    assert m.explanations == "none" and m.engine.methods == []
    assert "TorchScript runs no Python forward hooks" in m.explanations_note


@pytest.mark.parametrize(("spec", "message"), [
    (ModelSpec("x", "nowhere:model.bin"), "unknown source"),
    (ModelSpec("x", "torchvision:resnet999"), "unknown torchvision classifier"),
    (ModelSpec("x", "torchvision:resnet18", weights="/nope.pth"), "weights file not found"),
    (ModelSpec("x", "builtin:shapes", device="cuda:7"), "CUDA is not available"),
])
def test_load_errors_name_the_model_and_the_problem(spec, message):
    if "cuda" in spec.device and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


def test_settings_refuse_duplicates_and_unknown_defaults():
    shapes = ModelSpec("shapes", "builtin:shapes")
    with pytest.raises(ConfigError, match="twice"):
        Settings(models=(shapes, shapes))
    with pytest.raises(ConfigError, match="`default_model` 'nope'"):
        Settings(models=(shapes,), default_model="nope")


def test_config_file_and_environment(tmp_path):
    cfg = tmp_path / "models.toml"
    cfg.write_text('default_model = "b"\n[server]\nmax_batch_size = 8\nmax_queue = 10\n'
                   '[models.a]\nsource = "builtin:shapes"\n[models.b]\nsource = "torchvision:resnet18"\n'
                   'weights = "none"\nprecision = "bf16"\n[models.b.preprocess]\nresize = 64\ncrop = 64\n')
    s = load_settings(cfg, env={"SERVICE_MAX_QUEUE": "99", "SERVICE_API_KEYS": "a, b"})
    assert (s.max_batch_size, s.max_queue, s.api_keys, s.default_model) == (8, 99, ("a", "b"), "b")
    assert [m.name for m in s.models] == ["a", "b"]
    assert s.models[1].precision == "bf16"
    with pytest.raises(ConfigError, match="max_wait_ms"):
        load_settings(cfg, env={"SERVICE_MAX_WAIT_MS": "soon"})
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.a]\nsource = "builtin:shapes"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match="colour"):
        load_settings(bad)
