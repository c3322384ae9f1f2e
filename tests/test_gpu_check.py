"""The GPU check's dry run: the script ``make gpu-check`` runs on a CUDA machine, here on CPU at small sizes,
so that it cannot rot between the runs on a GPU."""

from __future__ import annotations

import json

import pytest

from tests.gpu import gpu_check


def _records(out):
    return [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]


def test_the_compute_parts_run_on_cpu_and_fill_the_table(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--small", "--out", str(tmp_path),
                           "parity", "syncs", "speed", "cudatests", "bench", "table"]) == 0
    records = _records(tmp_path)
    assert not [r for r in records if "fatal" in r or "error" in r]
    parity = [r for r in records if r["part"] == "parity" and "query" in r]
    methods = {r["query"]["method"] for r in parity}
    assert methods == set(gpu_check.METHODS)
    for r in parity:  # CPU autocast stands in for the device: the same targets hold
        assert r["fp32_r"] >= 0.999 and r["bf16_r"] >= 0.99 and r["fp16_r"] >= 0.99, r
    assert {r["batch"] for r in records if r["part"] == "speed" and "batch" in r} == {1, 2}
    assert [r["skipped"] for r in records if "skipped" in r] == [
        "needs CUDA (torch.cuda.set_sync_debug_mode)", "needs CUDA", "needs CUDA"]
    table = (tmp_path / "gpu-table.md").read_text()
    assert "| parity bf16, min r over 16 cases | >= 0.99 |" in table
    assert "NOT met" not in table


def test_the_table_says_what_was_not_met():
    records = [{"part": "parity", "fp32_r": 0.9995, "bf16_r": 0.95, "fp16_r": 0.995},
               {"part": "http_summary", "concurrency": 64, "batching_gain_predict": 5.1, "batching_gain_explain": 3.2,
                "explain_over_predict_r50bf": 1.05},
               {"part": "oom", "limit_gb": 0.25, "predict_status": 503, "predict_json": True, "healthz_after": 200},
               {"part": "cudatests", "rc": 1}]
    rows = {line.split(" | ")[0].strip("| "): line for line in gpu_check.table(records).splitlines()}
    assert rows["parity fp32, min r over 1 cases"].endswith("| met |")
    assert rows["parity bf16, min r over 1 cases"].endswith("| NOT met |")
    assert rows["batching gain predict, concurrency 64"].endswith("| met |")
    assert rows["batching gain explain, concurrency 64"].endswith("| NOT met |")
    assert rows["explain / predict time over HTTP, bf16"].endswith("| met |")
    assert rows["memory cap: 5xx without a JSON error, or a dead server"].endswith("| met |")
    assert rows["cudatests"].endswith("| NOT met |")
    assert rows["bench"].endswith("| n/a |")


@pytest.mark.slow
def test_the_server_parts_run_on_cpu(tmp_path):
    """A real server (resnet50 at 64 px) under load, batched and not, and one under the memory cap's harness."""
    assert gpu_check.main(["--device", "cpu", "--small", "--out", str(tmp_path), "http", "oom", "table"]) == 0
    records = _records(tmp_path)
    assert not [r for r in records if "fatal" in r or "error" in r]
    summary = next(r for r in records if r["part"] == "http_summary")
    assert summary["batching_gain_predict"] and summary["explain_over_predict_r50bf"]
    oom = [r for r in records if r["part"] == "oom" and "limit_gb" in r]
    assert [r["predict_status"] for r in oom] == [200, 200] and all(r["healthz_after"] == 200 for r in oom)
    assert all(r["predict_top_matches_alone"] for r in oom)
