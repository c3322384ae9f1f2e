"""The widened explain options over HTTP: new methods, layer lists, smoothing, metrics, the extra-forward budget."""

from __future__ import annotations

from tests.api.conftest import b64, make_client, png_bytes, scene


def test_models_list_each_methods_cost_class(client):
    detail = client.get("/models/shapes").json()
    costs = detail["method_costs"]
    assert costs["gradcam"] == "free" and costs["scorecam"] == "forwards" and costs["ablationcam"] == "replay"
    assert costs["guided-gradcam"] == "backward" and set(costs) == set(detail["methods"])


def test_scorecam_with_metrics_from_a_form(client, circle_png):
    r = client.post("/explain?metrics=confidence,deletion&metric_steps=4",
                    files={"image": ("c.png", circle_png, "image/png")},
                    data={"method": "scorecam", "targets": "circle", "output": "array", "size": "feature",
                          "metrics": "insertion"})
    assert r.status_code == 200, r.text
    (e,) = r.json()["results"][0]["explanations"]
    assert e["method"] == "scorecam" and e["label"] == "circle"
    # The form's value wins over the query's, as for every option.
    assert set(e["metrics"]) == {"insertion", "steps"} and e["metrics"]["steps"] == 4


def test_json_metrics_layers_and_smoothing(client):
    layers = client.get("/models/shapes").json()["layers"]
    body = {"image": b64(png_bytes(scene("ring", seed=2)[0])), "targets": ["ring"], "layer": layers[:2],
            "fuse": "max", "smooth": "aug", "metrics": ["confidence", "deletion", "insertion"], "output": "array",
            "size": "input"}
    r = client.post("/explain", json=body)
    assert r.status_code == 200, r.text
    (e,) = r.json()["results"][0]["explanations"]
    assert e["layer"] == "+".join(layers[:2]) and e["heatmap"]["width"] == 64
    m = e["metrics"]
    assert set(m) == {"average_drop", "increase", "deletion", "insertion", "steps"} and m["steps"] == 16
    assert 0 <= m["deletion"] <= 1 and 0 <= m["insertion"] <= 1 and m["increase"] in (0.0, 1.0)


def test_bad_options_are_422_naming_the_value(client, circle_png):
    cases = [({"method": "nope"}, "'nope'"), ({"fuse": "sum", "layer": "features"}, "'sum'"),
             ({"smooth": "blur"}, "'blur'"), ({"metrics": "truth"}, "'truth'"), ({"metric_steps": "3"}, "metric_steps")]
    for data, shown in cases:
        r = client.post("/explain", files={"image": ("c.png", circle_png, "image/png")}, data=data)
        assert r.status_code == 422 and shown in r.json()["error"]["message"], (data, r.text)


def test_over_the_extra_forward_budget_is_422_with_cost_and_limit(circle_png):
    with make_client(max_extra_forwards=100) as c:
        ok = c.post("/explain", files={"image": ("c.png", circle_png, "image/png")}, data={"method": "gradcam"})
        assert ok.status_code == 200
        r = c.post("/explain", files={"image": ("c.png", circle_png, "image/png")},
                   data={"method": "scorecam", "metrics": "deletion,insertion", "metric_steps": "32"})
    assert r.status_code == 422
    assert "needs 128 extra forward images, over the limit of 100" in r.json()["error"]["message"]
