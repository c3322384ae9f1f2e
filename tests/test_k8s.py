"""The Kubernetes manifests under docker/k8s, offline.

Core kinds (and the pod templates inside the custom resources) are validated strictly against the
Kubernetes OpenAPI schemas that kubernetes-validate ships; the KServe and KubeRay resources are checked
for the fields their operators require; the RayService's Serve config is validated by Ray's own schema
class when Ray is installed. Then the things an operator relies on: probes on the right endpoints, a
termination grace period longer than the drain time, non-root pods, selectors that match.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from service.config import Settings
from service.rayserve import proxy_environment

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docker" / "k8s"
# The oldest Kubernetes still commonly run, and the newest the validator knows.
VERSIONS = ["1.29", kubernetes_validate.latest_version()]
DRAIN_TIMEOUT_S = 30  # the images' SERVICE_DRAIN_TIMEOUT_S
PRESTOP_S = 5
# Arguments of service.rayserve:build_app (the Ray Serve application builder).
BUILDER_ARGS = {"config", "replicas", "min_replicas", "max_replicas", "num_cpus", "num_gpus"}
# A predictor is a pod spec plus these KServe fields (the InferenceService CRD, serving.kserve.io/v1beta1);
# the framework blocks are the alternative to a custom container.
KSERVE_FRAMEWORKS = {"model", "sklearn", "xgboost", "lightgbm", "tensorflow", "pytorch", "triton", "onnx", "pmml",
                     "paddle", "huggingface"}
KSERVE_PREDICTOR_FIELDS = KSERVE_FRAMEWORKS | {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "autoScaling",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
    "deploymentStrategy", "workerSpec", "storageUris", "storageContainerName",
}
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


def as_pod(spec: dict[str, Any], name: str = "template") -> dict[str, Any]:
    """A pod spec wrapped as a Pod, so the core schema checks the pods inside custom resources."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


PLAIN = by_kind(load("camserve.yaml"))
ISVC = load("kserve.yaml")[0]
RAY = load("rayservice.yaml")[0]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", sorted(PLAIN))
def test_core_kinds_validate_strictly(kind, version):
    kubernetes_validate.validate(PLAIN[kind], version, strict=True)


def test_strict_validation_rejects_a_misspelt_field():
    """Proves the check above can fail: strict mode refuses a field the schema does not know."""
    bad = copy.deepcopy(PLAIN["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_pods_inside_custom_resources_validate_strictly(version):
    predictor = {k: v for k, v in ISVC["spec"]["predictor"].items() if k not in KSERVE_PREDICTOR_FIELDS}
    kubernetes_validate.validate(as_pod(predictor, "predictor"), version, strict=True)
    cluster = RAY["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        kubernetes_validate.validate(as_pod(group["template"]["spec"]), version, strict=True)


def _container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def test_deployment_probes_and_shutdown():
    pod = PLAIN["Deployment"]["spec"]["template"]["spec"]
    c = _container(pod)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The start-up probe must allow for model loading: minutes, not the liveness probe's seconds.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    env = {e["name"]: e for e in c["env"]}
    assert float(env["SERVICE_DRAIN_TIMEOUT_S"]["value"]) == DRAIN_TIMEOUT_S
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_S)]
    grace = Settings().shutdown_grace_s
    if "SERVICE_SHUTDOWN_GRACE_S" in env:
        grace = float(env["SERVICE_SHUTDOWN_GRACE_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] > PRESTOP_S + grace + DRAIN_TIMEOUT_S
    # Torch threads follow the pod's CPU limit, not the node's core count.
    assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert "cpu" in c["resources"]["limits"] and "memory" in c["resources"]["limits"]


def test_deployment_runs_non_root_and_locked_down():
    pod = PLAIN["Deployment"]["spec"]["template"]["spec"]
    c = _container(pod)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs a writable /tmp.
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


def test_service_hpa_and_pdb_point_at_the_deployment():
    deployment = PLAIN["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert PLAIN["Service"]["spec"]["selector"].items() <= labels.items()
    assert PLAIN["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in _container(deployment["spec"]["template"]["spec"])["ports"]}
    assert {p["targetPort"] for p in PLAIN["Service"]["spec"]["ports"]} <= port_names
    ref = PLAIN["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    # The PDB must leave room to evict a pod at the HPA's minimum, or node drains block forever.
    hpa, pdb = PLAIN["HorizontalPodAutoscaler"]["spec"], PLAIN["PodDisruptionBudget"]["spec"]
    assert pdb["minAvailable"] < hpa["minReplicas"]
    models = PLAIN["ConfigMap"]["data"]["models.toml"]
    assert tomllib.loads(models)["models"], "the ConfigMap's models.toml names no model"


def test_inferenceservice_required_fields():
    assert ISVC["apiVersion"] == "serving.kserve.io/v1beta1" and ISVC["kind"] == "InferenceService"
    assert DNS_1123_LABEL.fullmatch(ISVC["metadata"]["name"])
    predictor = ISVC["spec"]["predictor"]
    # A custom predictor: containers, and no model/framework block beside them.
    assert not KSERVE_FRAMEWORKS & set(predictor) and "containers" in predictor
    c = _container(predictor)
    assert c["name"] == "kserve-container" and c["image"]
    port = c["ports"][0]["containerPort"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert predictor["terminationGracePeriodSeconds"] > DRAIN_TIMEOUT_S
    assert predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["securityContext"]["runAsNonRoot"] is True


def test_rayservice_required_fields():
    """What the RayService CRD (ray.io/v1) requires: rayClusterConfig.headGroupSpec.template; per worker
    group groupName, minReplicas, maxReplicas and template; rayStartParams as strings."""
    assert RAY["apiVersion"] == "ray.io/v1" and RAY["kind"] == "RayService"
    assert DNS_1123_LABEL.fullmatch(RAY["metadata"]["name"])
    spec = RAY["spec"]
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string, not a mapping"
    cluster = spec["rayClusterConfig"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", cluster["rayVersion"])
    head = cluster["headGroupSpec"]
    groups = [head, *cluster["workerGroupSpecs"]]
    for group in groups:
        assert group["template"]["spec"]["containers"]
        # KubeRay passes these to `ray start` and its CRD types them as strings.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
    for worker in cluster["workerGroupSpecs"]:
        assert DNS_1123_LABEL.fullmatch(worker["groupName"])
        assert 0 <= worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    gpu_workers = [w for w in cluster["workerGroupSpecs"]
                   if "nvidia.com/gpu" in _container(w["template"]["spec"])["resources"]["limits"]]
    assert gpu_workers, "no worker group asks for GPUs"
    for worker in gpu_workers:
        resources = _container(worker["template"]["spec"])["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
        assert worker["template"]["spec"]["terminationGracePeriodSeconds"] > DRAIN_TIMEOUT_S


def test_every_ray_container_gives_serves_proxy_camserves_environment():
    """Serve starts a proxy on every node; without these it has neither the head limits nor the 503s, and a
    slow node's proxy is killed after Serve's 5 s ready check."""
    expected = proxy_environment(Settings())
    cluster = RAY["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        container = _container(group["template"]["spec"])
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert {k: env.get(k) for k in expected} == expected, container["name"]


def test_rayservice_ray_version_is_in_the_declared_range():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    if "ray" not in extras:
        pytest.skip("pyproject.toml declares no ray extra yet")
    spec = next(r for r in extras["ray"] if r.startswith("ray"))
    version = RAY["spec"]["rayClusterConfig"]["rayVersion"]
    assert version in SpecifierSet(re.sub(r"^ray(\[[^]]*\])?", "", spec)), f"rayVersion {version} vs {spec}"


def serve_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(RAY["spec"]["serveConfigV2"])
    return config


def test_serve_config_deploys_the_camserve_builder():
    apps = serve_config()["applications"]
    assert len(apps) == 1
    app = apps[0]
    assert app["import_path"] == "service.rayserve:build_app"
    assert app["route_prefix"] == "/"
    assert set(app["args"]) <= BUILDER_ARGS, f"unknown builder args {set(app['args']) - BUILDER_ARGS}"
    assert app["args"]["num_gpus"] > 0
    # The config path must exist in the pods: the models ConfigMap is mounted there.
    mount = Path(app["args"]["config"]).parent.as_posix()
    cluster = RAY["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert mount in {m["mountPath"] for m in _container(group["template"]["spec"])["volumeMounts"]}


def test_rayservice_serves_grpc_through_the_head_service():
    """Serve's gRPC proxies listen on grpc_options.port with camserve's servicer hook; KubeRay's serve
    Service carries only the `serve` port, so the head container names the gRPC port for the head Service."""
    options = serve_config()["grpc_options"]
    module, _, function = options["grpc_servicer_functions"][0].rpartition(".")
    # Checked as text: importing the generated module here would register its messages in this process.
    assert f"def {function}(" in (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert options["grpc_servicer_functions"] == [
        "service.api.grpc_gen.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"]
    head = _container(RAY["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"])
    assert {"name": "grpc", "containerPort": options["port"]} in head["ports"]
    plain = {p["name"]: p["port"] for p in PLAIN["Service"]["spec"]["ports"]}
    assert options["port"] == plain["grpc"]  # the same port as the plain Deployment's


def test_serve_config_matches_rays_schema():
    schema = pytest.importorskip("ray.serve.schema")
    parsed = schema.ServeDeploySchema.model_validate(serve_config())
    assert [a.import_path for a in parsed.applications] == ["service.rayserve:build_app"]
    with pytest.raises(ValueError, match="import_path"):
        schema.ServeDeploySchema.model_validate({"applications": [{"name": "x", "route_prefix": "/"}]})
