"""The configuration is checked whole before anything loads; every problem is one line naming the
model, the key, the value and what was expected. Start-up and `camserve explain` failures are one
line and exit code 2, never a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from service.config import ConfigError, load_settings
from service.modelspec import ModelSpec
from service.preprocess import Geometry
from service.registry import ModelLoadError, load_model
from tests.api.conftest import png_bytes, scene
from tests.api.models import TINY_PRE

ROOT = Path(__file__).resolve().parents[1]


def _problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env=env or {})
    return info.value.problems


@pytest.mark.parametrize(("text", "expected"), [
    ("[server]\nmax_batch_size = 4.5\n", "setting `max_batch_size` must be an integer, got 4.5"),
    ("[server]\nmax_batch_size = true\n", "setting `max_batch_size` must be an integer, got True"),
    ('[server]\nlog_level = "verbose"\n', "setting `log_level` must be one of debug, info, warning, error, critical, "
                                          "got 'verbose'"),
    ('[server]\napi_keys_file = "/nonexistent/keys"\n', "setting `api_keys_file`: no such file '/nonexistent/keys'"),
    ("[server]\nrequest_timeout_s = -1\n", "setting `request_timeout_s` must be a finite number of at least 0, got -1"),
    ("[server]\ndrain_timeout_s = -0.5\n", "setting `drain_timeout_s` must be a finite number of at least 0"),
    ('[models.m]\nsource = "builtin:shapes"\n[models.m.preprocess]\ncrop = "64"\n',
     "model 'm': `preprocess.crop` must be a positive integer, [height, width], or false for no crop, got '64'"),
    ('[models.m]\nsource = "builtin:shapes"\n[models.m.preprocess]\nstd = [0.5, 0.5]\n',
     "model 'm': `preprocess.std` must be a list of 3 positive numbers, got [0.5, 0.5]"),
    ('[models]\na = "builtin:shapes"\n', "model 'a': must be a table ([models.a] with `source` = ...), got str"),
    ('[models.m]\nsource = "tflite:x.tflite"\n', "model 'm': `source` must start with one of builtin, torchvision"),
    ('[models.m]\nsource = "builtin:shapes"\noutput = "logits"\n', "model 'm': `output` must be one of softmax, "
                                                                      "sigmoid, none, got 'logits'"),
    ('default_model = "nope"\n[models.m]\nsource = "builtin:shapes"\n', "`default_model` 'nope' is not among"),
    ("[server]\ngrpc_port = 70000\n", "setting `grpc_port` must be in 0..65535, got 70000"),
    ('[models.m]\nsource = "builtin:shapes"\n[models.m.preprocess]\nletterbox = "middle"\n',
     "model 'm': `preprocess.letterbox` must be center, top-left, or false for a plain resize, got 'middle'"),
    ('[models.m]\nsource = "builtin:shapes"\n[models.m.preprocess]\nfill = [0, 300, 0]\n',
     "model 'm': `preprocess.fill` must be an integer from 0 to 255, or a list of 3, got [0, 300, 0]"),
    ('[models.m]\nsource = "builtin:shapes"\n[models.m.preprocess]\nletterbox = "center"\nresize = 64\n',
     "model 'm': `preprocess.letterbox` fits the image inside `resize` as [height, width], got resize = 64"),
    ('[models.m]\nsource = "builtin:shapes"\n[models.m.preprocess]\nletterbox = "top-left"\ncrop = 56\n',
     "model 'm': `preprocess.letterbox` takes no `crop`, got crop = 56"),
    ("[server]\nport = 8001\ngrpc_port = 8001\n", "setting `grpc_port` must differ from `port`, both are 8001"),
])
def test_each_problem_is_one_line_naming_key_and_value(tmp_path, text, expected):
    problems = _problems(tmp_path, text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems[0]


def test_every_problem_is_reported_at_once(tmp_path):
    problems = _problems(tmp_path, '[server]\nmax_queue = 0\nport = "x"\n[models.a]\nsource = "builtin:shapes"\n'
                                   'colour = "red"\n[models.b]\nweights = 3\n', env={"SERVICE_MAX_WAIT_MS": "soon"})
    text = "\n".join(problems)
    for part in ("`port` must be an integer", "`max_wait_ms` (from SERVICE_MAX_WAIT_MS) must be a number",
                 "model 'a': unknown key `colour`", "model 'b': `weights` must be a string",
                 "model 'b': `source` is required"):
        assert part in text, text


def test_environment_strings_are_parsed_and_zero_timeout_means_no_limit(tmp_path):
    s = load_settings(None, env={"SERVICE_REQUEST_TIMEOUT_S": "0", "SERVICE_DRAIN_TIMEOUT_S": "0.5",
                                 "SERVICE_MAX_BATCH_SIZE": "8"})
    assert (s.request_timeout_s, s.drain_timeout_s, s.max_batch_size) == (0.0, 0.5, 8)
    from service.app import limits

    assert limits(s).timeout_s is None


def test_grpc_port_is_off_unless_set():
    assert load_settings(None, env={}).grpc_port is None
    assert load_settings(None, env={"SERVICE_GRPC_PORT": "8001"}).grpc_port == 8001
    assert load_settings(None, env={"SERVICE_GRPC_PORT": ""}).grpc_port is None
    with pytest.raises(ConfigError, match=r"`grpc_port` \(from SERVICE_GRPC_PORT\) must be an integer, got 'h2'"):
        load_settings(None, env={"SERVICE_GRPC_PORT": "h2"})


def test_a_partial_preprocess_table_keeps_the_other_defaults():
    spec = ModelSpec.from_table("r", {"source": "torchvision:resnet18", "weights": "none",
                                      "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}})
    m = load_model(spec)
    assert m.preprocess.input_size == (224, 224)
    assert m.preprocess.resize == 256
    assert m.preprocess.mean == (0.5, 0.5, 0.5)
    no_crop = load_model(ModelSpec.from_table("s", {"source": "builtin:shapes", "preprocess": {"crop": False,
                                                                                                 "resize": [48, 40]}}))
    assert no_crop.preprocess.input_size == (48, 40)


def test_a_letterbox_alone_fits_inside_the_sources_input_size():
    m = load_model(ModelSpec.from_table("d", {"source": "builtin:shapes-detect",
                                              "preprocess": {"letterbox": "center", "fill": 114}}))
    pre = m.preprocess
    assert (pre.input_size, pre.crop, pre.letterbox, pre.fill) == ((64, 64), None, "center", (114, 114, 114))
    assert pre.geometry(30, 60) == Geometry((30, 60), (32, 64), (-16, 0, 64, 64))


@pytest.mark.slow
def test_a_torchvision_detector_letterboxes_unless_told_not_to():
    # Top-left, on the pixel its own transform normalises to zero: what its own batching pads with.
    det = load_model(ModelSpec.from_table("t", {"source": "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
                                                "task": "detection", "options": {"num_classes": 3}}))
    assert (det.preprocess.input_size, det.preprocess.letterbox, det.preprocess.fill) == ((320, 320), "top-left",
                                                                                          (124, 116, 104))
    plain = load_model(ModelSpec.from_table("p", {"source": "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
                                                  "task": "detection", "options": {"num_classes": 3},
                                                  "preprocess": {"letterbox": False}}))
    assert plain.preprocess.letterbox is None
    assert plain.preprocess.geometry(200, 300) == Geometry((200, 300), (320, 320), (0, 0, 320, 320))
    with pytest.raises(ModelLoadError, match=re.escape("`letterbox = false` for a resize and crop")):
        load_model(ModelSpec.from_table("c", {"source": "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
                                              "task": "detection", "preprocess": {"crop": 224}}))


def test_labels_are_read_for_every_source(tmp_path):
    (tmp_path / "four.txt").write_text("w\nx\ny\nz\n")
    (tmp_path / "three.txt").write_text("x\ny\nz\n")
    (tmp_path / "five.json").write_text('["a", "b", "c", "d", "e"]')
    pre = {"resize": [32, 32]}
    m = load_model(ModelSpec("p", "python:tests.api.models:tiny", labels=str(tmp_path / "four.txt"), preprocess=pre))
    assert m.labels == ["w", "x", "y", "z"]
    assert load_model(ModelSpec("s", "builtin:shapes", labels=str(tmp_path / "five.json"))).labels == list("abcde")
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelSpec("p", "python:tests.api.models:tiny", labels=str(tmp_path / "three.txt"), preprocess=pre))
    assert str(info.value) == f"model 'p': 3 labels in {tmp_path / 'three.txt'} but the model has 4 outputs"
    with pytest.raises(ModelLoadError, match="model 's': cannot read labels file"):
        load_model(ModelSpec("s", "builtin:shapes", labels=str(tmp_path / "missing.txt")))


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("passwd", "root:x:0:0:root:/root:/bin/bash\n", "must end in .txt, .json, .labels"),
    ("bin.txt", b"\xff\xfe\x00binary", "is not UTF-8 text"),
    ("ctl.txt", "a\nb\x1b[31mred\n", "control characters"),
    ("long.txt", "x" * 300 + "\n", "longer than 256"),
])
def test_labels_files_must_be_what_an_operator_meant(tmp_path, name, content, needle):
    """Labels are shown to every caller: a mistyped path (/etc/passwd) or a binary is refused at load,
    even with `weights = "none"`, where the head would otherwise be sized to fit the file."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ModelLoadError, match=re.escape(needle)):
        load_model(ModelSpec("pw", "torchvision:resnet18", weights="none", labels=str(path)))


def test_weights_files_that_hold_something_else_say_what(tmp_path):
    cases = {"list.pth": [torch.zeros(3)], "tensor.pth": torch.zeros(3), "empty.pth": {},
             "notes.pth": {"epoch": 3, "lr": 0.1}}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ModelLoadError, match=r"holds .*; expected a"):
            load_model(ModelSpec("ev", "torchvision:resnet18", weights=str(tmp_path / name)))
        with pytest.raises(ModelLoadError, match=r"holds .*; expected a shapes checkpoint"):
            load_model(ModelSpec("ev", "builtin:shapes", weights=str(tmp_path / name)))
    # A checkpoint nesting the state_dict under `model` loads; one for another architecture is named so.
    import torchvision

    torch.save({"epoch": 3, "model": torchvision.models.resnet18(num_classes=4).state_dict()}, tmp_path / "ck.pth")
    assert load_model(ModelSpec("ev", "torchvision:resnet18", weights=str(tmp_path / "ck.pth"))).num_classes == 4
    with pytest.raises(ModelLoadError, match=r"do not fit torchvision.s resnet34: .* missing keys"):
        load_model(ModelSpec("ev", "torchvision:resnet34", weights=str(tmp_path / "ck.pth")))


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_labels_for_torchscript(tmp_path):
    from tests.api.models import Tiny

    torch.jit.save(torch.jit.trace(Tiny().eval(), torch.randn(1, 3, 32, 32)), str(tmp_path / "t.pt"))
    (tmp_path / "l.txt").write_text("a\nb\nc\nd\n")
    m = load_model(ModelSpec("ts", f"torchscript:{tmp_path / 't.pt'}", labels=str(tmp_path / "l.txt"),
                             preprocess={"resize": [32, 32]}))
    assert m.labels == ["a", "b", "c", "d"]


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    from tests.api.models import Tiny

    torch.manual_seed(3)
    ref = Tiny()
    ref.head.weight.data.normal_()
    save_file(ref.state_dict(), str(tmp_path / "t.safetensors"))
    m = load_model(ModelSpec("t", "python:tests.api.models:tiny", weights=str(tmp_path / "t.safetensors"),
                             preprocess={"resize": [32, 32]}))
    x = TINY_PRE.normalize(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8))
    torch.testing.assert_close(m.engine.predict(x), ref.eval()(x))


def test_a_sigmoid_head_is_not_always_one():
    spec = ModelSpec("b", "python:tests.api.models:binary", output="sigmoid", preprocess={"resize": [32, 32]})
    m = load_model(spec)
    x = TINY_PRE.normalize(torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8))
    logits = m.engine.predict(x)
    torch.testing.assert_close(m.scores(logits), torch.sigmoid(logits))
    assert not torch.allclose(m.scores(logits), torch.ones_like(logits))
    softmax = load_model(ModelSpec("b", "python:tests.api.models:binary", preprocess={"resize": [32, 32]}))
    assert torch.allclose(softmax.scores(logits), torch.ones_like(logits))  # why sigmoid exists


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env_path = {"PYTHONPATH": str(ROOT)}
    import os

    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, env={**os.environ, **env_path})


@pytest.mark.slow
@pytest.mark.parametrize(("table", "expected"), [
    ('source = "torchvision:resnet18"\nweights = "/nonexistent/r18.pth"\n', "weights file not found"),
    ('source = "builtin:shapes"\ntarget_layer = "nope"\n', "`target_layer`: `layer` must name a spatial layer"),
    ('source = "python:no_such_module:make"\n', "cannot import module 'no_such_module'"),
    ('source = "builtin:shapes"\ndevice = "cuda:3"\n', "CUDA is not available"),
])
def test_serve_reports_a_model_that_cannot_load_in_one_line(tmp_path, table, expected):
    if "cuda" in table and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "c.toml").write_text(f"[models.m]\n{table}")
    done = _run([sys.executable, "-m", "service", "serve", "--config", "c.toml", "--port", "1"], tmp_path)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("camserve:")]
    assert len(lines) == 1 and "model 'm'" in lines[0] and expected in lines[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_camserve_explain_imports_factories_from_the_current_directory(tmp_path):
    (tmp_path / "mymodels.py").write_text("from tests.api.models import Tiny\n\ndef make():\n    return Tiny()\n")
    (tmp_path / "c.toml").write_text('[models.m]\nsource = "python:mymodels:make"\n[models.m.preprocess]\n'
                                     'resize = [32, 32]\n')
    (tmp_path / "img.png").write_bytes(png_bytes(np.full((40, 40, 3), 90, np.uint8)))
    camserve = str(Path(sys.executable).parent / "camserve")
    done = _run([camserve, "explain", "img.png", "--config", "c.toml", "--target", "1", "--target", "2",
                 "--target", "1", "--out", "h.png"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.glob("h-*.png")) == ["h-1-class_1.png", "h-2-class_2.png"]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "expected"), [
    (["img.png", "--target", "hexagon"], "unknown target class 'hexagon'"),
    (["img.png", "--method", "magic"], "`method` must be one of"),
    (["missing.png"], "cannot read missing.png"),
    (["notimage.png"], "not an image"),
    (["img.png", "--config", "bad.toml"], "setting `max_queue` must be an integer"),
    (["img.png", "--model", "nope"], "unknown model 'nope'"),
])
def test_camserve_explain_user_errors_are_one_line(tmp_path, args, expected):
    (tmp_path / "img.png").write_bytes(png_bytes(scene("circle")[0]))
    (tmp_path / "notimage.png").write_text("hello")
    (tmp_path / "bad.toml").write_text("[server]\nmax_queue = 'lots'\n")
    done = _run([sys.executable, "-m", "service", "explain", *args], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("camserve: ") and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("config", "expected"), [
    ("[server]\nmax_queue = 'lots'\n", ["setting `max_queue` must be an integer"]),
    ("models = 5\n", ["`models` must hold [models.<name>] tables"]),
    ("[server]\nmax_batch_size = 4.5\ndrain_timeout_s = -1\n",
     ["setting `max_batch_size` must be an integer", "setting `drain_timeout_s` must be a finite number"]),
    (None, ["config file not found"]),
])
@pytest.mark.parametrize("command", ["evaluate", "explain"])
def test_cli_config_problems_are_lines_and_exit_2(tmp_path, capsys, config, expected, command):
    """In process (the subprocess tests above cover the entry point): every problem, one line each,
    type and range errors together, no traceback."""
    from service.cli import main

    if config is not None:
        (tmp_path / "bad.toml").write_text(config)
    args = ["--config", str(tmp_path / "bad.toml")]
    argv = ["evaluate", *args, "--shapes", "2"] if command == "evaluate" else ["explain", "img.png", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == len(expected) and all(line.startswith("camserve: ") for line in lines), err
    for line, needle in zip(lines, expected, strict=True):
        assert needle in line, err


def test_cli_explain_checks_the_output_folder_first(tmp_path, capsys, monkeypatch):
    from service import cli

    (tmp_path / "img.png").write_bytes(png_bytes(scene("circle")[0]))
    monkeypatch.setattr("service.repository.load_model", lambda spec: pytest.fail("loaded before checking --out"))
    assert cli.main(["explain", str(tmp_path / "img.png"), "--out", str(tmp_path / "missing" / "heat.png")]) == 2
    assert "no such folder" in capsys.readouterr().err
