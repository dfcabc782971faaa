"""The KubeRay manifests and PodMonitors under infra/: valid against KubeRay's own CRD schemas (the
minimum supported release, vendored in tests/kuberay/, made strict so a field KubeRay does not know
is an error), wired the way KubeRay's code expects (token auth, Secret key, one RayJob per step), and
declaring every metrics port the jobs bind."""

from __future__ import annotations

import copy
import json
import re

import jsonschema
import pytest
import ray
import yaml

from tests.commands import REPO, check_entry_point, entry_point

K8S = REPO / "infra" / "k8s"
KUBERAY = "v1.5.1"
STEPS = ("ingest", "train", "label")


def _docs(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _image() -> str:
    """The image name infra/docker/build.sh builds: every manifest must run exactly this one."""
    match = re.search(r'IMAGE="\$\{IMAGE:-([^}]+)\}"', (REPO / "infra" / "docker" / "build.sh").read_text())
    assert match, "build.sh must define IMAGE with a default"
    return match.group(1)


def strict(schema):
    """``schema`` with every object that lists its properties closed to others (additionalProperties
    false), except where Kubernetes keeps unknown fields on purpose: the API server prunes unknown
    fields silently, so a misspelt key would otherwise be dropped without a word."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (strict(v) if k != "properties" else {p: strict(s) for p, s in v.items()}) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def _validator(kind: str) -> jsonschema.Draft7Validator:
    crd = json.loads((REPO / "tests" / "kuberay" / KUBERAY / f"{kind}.ray.io.json").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


VALIDATORS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}


def _validate(doc: dict) -> None:
    errors = sorted(_validator(VALIDATORS[doc["kind"]]).iter_errors(doc), key=str)
    assert not errors, "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])


def _cluster() -> dict:
    (cluster,) = _docs(K8S / "raycluster.yaml")
    return cluster


def _jobs() -> dict[str, dict]:
    jobs = {}
    for step in STEPS:
        (job,) = _docs(K8S / f"rayjob-{step}.yaml")
        jobs[step] = job
    return jobs


def _groups(cluster: dict) -> list[dict]:
    return [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]


def _ports(group: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in group["template"]["spec"]["containers"] for p in c.get("ports", [])}


def test_every_manifest_validates_against_kuberays_crd_schema():
    assert ray.__version__ == _cluster()["spec"]["rayVersion"]
    for doc in [_cluster(), *_jobs().values()]:
        assert doc["apiVersion"] == "ray.io/v1"
        _validate(doc)


@pytest.mark.parametrize(
    "where",
    [
        ("spec",),
        ("spec", "authOptions"),
        ("spec", "headGroupSpec", "template", "spec", "containers", 0),
        ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources"),
    ],
)
def test_a_field_kuberay_does_not_know_is_an_error(where):
    cluster = copy.deepcopy(_cluster())
    node = cluster
    for key in where:
        node = node[key]
    node["nodeSelectr"] = {"a": "b"}
    with pytest.raises(AssertionError, match="nodeSelectr"):
        _validate(cluster)


def test_a_misspelt_rayjob_field_is_an_error():
    job = copy.deepcopy(_jobs()["train"])
    job["spec"]["clusterSelectr"] = job["spec"].pop("clusterSelector")
    with pytest.raises(AssertionError, match="clusterSelectr"):
        _validate(job)


def test_token_auth_is_kuberays_with_the_secret_in_the_form_it_reads():
    cluster = _cluster()
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    secrets = {d["metadata"]["name"]: d for d in _docs(K8S / "secrets.example.yaml")}
    # KubeRay (controllers/ray/utils/constant.go) reads key auth_token of the Secret named after the cluster
    assert set(secrets[cluster["metadata"]["name"]]["stringData"]) == {"auth_token"}
    for group in _groups(cluster):
        for container in group["template"]["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}, "KubeRay sets these"
            for source in container["envFrom"]:
                assert source["secretRef"]["name"] in secrets
            assert container["image"] == _image()
    s3 = secrets["clustercam-s3"]["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(s3)


def test_worker_groups_split_cpu_work_from_gpu_work_without_gpu_feature_discovery():
    cluster = _cluster()
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs drivers, never tasks"
    by_gpu: dict[bool, list] = {True: [], False: []}
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        spec = group["template"]["spec"]
        assert "nodeSelector" not in spec and "affinity" not in spec, "no GPU Feature Discovery labels"
        (container,) = spec["containers"]
        limits = container["resources"]["limits"]
        gpus = "nvidia.com/gpu" in limits
        by_gpu[gpus].append(group)
        if gpus:
            assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == "1"
            assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert by_gpu[True] and by_gpu[False], "a GPU group and a CPU group"


def test_one_rayjob_per_step_each_on_the_raycluster_with_a_valid_entry_point():
    cluster = _cluster()
    for step, job in _jobs().items():
        assert job["kind"] == "RayJob"
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        module, args = entry_point(job["spec"]["entrypoint"])
        assert module == f"pipelines.{step}"
        check_entry_point(module, args)
    assert not (K8S / "rayjobs.yaml").exists(), "applying every step at once starts train before its input exists"
    readme = (REPO / "README.md").read_text()
    applies = [readme.index(f"kubectl apply -f infra/k8s/rayjob-{step}.yaml") for step in STEPS]
    assert applies == sorted(applies), "the README applies the steps in order"


def _bound_ports(cluster) -> dict[str, set[int]]:
    """Where each job's processes bind: drivers on the head, ranks and actors on workers."""
    from workers.label import ACTOR_PORTS

    jobs = _jobs()

    def arg(step: str, key: str) -> str:
        return re.search(rf"\b{re.escape(key)}=(\S+)", jobs[step]["spec"]["entrypoint"]).group(1)

    for step, key in (("ingest", "metrics_addr"), ("train", "metrics.addr"), ("label", "metrics_addr")):
        assert arg(step, key) == "0.0.0.0", f"{step}: pods are scraped from outside"
    label = int(arg("label", "metrics_port"))
    return {
        "head": {int(arg("ingest", "metrics_port")), label},
        "cpu": set(range(label + 1, label + 1 + ACTOR_PORTS)),
        "gpu": {int(arg("train", "metrics.port"))} | set(range(label + 1, label + 1 + ACTOR_PORTS)),
    }


def test_every_metrics_port_the_jobs_bind_is_declared_and_scraped_by_a_podmonitor():
    cluster = _cluster()
    bound = _bound_ports(cluster)
    declared = {"head": _ports(cluster["spec"]["headGroupSpec"])}
    declared |= {g["groupName"]: _ports(g) for g in cluster["spec"]["workerGroupSpecs"]}
    gpu = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    gpus = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert {p for n, p in declared["gpu"].items() if n.startswith("cc-train-")} == set(range(9100, 9100 + gpus))
    for group, ports in bound.items():
        assert ports <= set(declared[group].values()), f"{group}: {sorted(ports - set(declared[group].values()))}"
        for name in declared[group]:
            assert len(name) <= 15 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name), name
    monitors = _docs(REPO / "infra" / "monitoring" / "podmonitors.yaml")
    scraped = set()
    for monitor in monitors:
        assert monitor["kind"] == "PodMonitor" and monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "clustercam"}
        scraped |= {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    named = {name for ports in declared.values() for name in ports}
    assert scraped <= named, f"PodMonitors name undeclared ports: {scraped - named}"
    wanted = {n for n in named if n.startswith("cc-")} | {"metrics"}
    assert wanted <= scraped, f"declared but never scraped: {wanted - scraped}"
    for group in _groups(cluster):
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "clustercam"
