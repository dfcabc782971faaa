"""The deployment files under infra/: they parse, carry the fields their tools require, and name
only the image, entry points, config files and metrics that exist in this repository."""

from __future__ import annotations

import json
import re

import pytest
import ray
import yaml

from system.telemetry import REGISTRY, ingest_metrics, label_metrics, train_metrics
from tests.commands import REPO, check_entry_point, entry_point

INFRA = REPO / "infra"


def _image() -> str:
    """The image name infra/docker/build.sh builds: every manifest must run exactly this one."""
    match = re.search(r'IMAGE="\$\{IMAGE:-([^}]+)\}"', (INFRA / "docker" / "build.sh").read_text())
    assert match, "build.sh must define IMAGE with a default"
    return match.group(1)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / "k8s" / name).read_text()) if d]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_dockerfile_installs_the_pinned_stack_and_copies_only_existing_paths():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M), "the image must run the Python the venv uses"
    copied = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert {"constraints.txt", "pyproject.toml", "system", "workers", "pipelines", "configs"} <= set(copied)
    for src in copied:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    for src in copied:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded from the build context"
    installs = re.findall(r"pip install (.+)", text)
    assert installs[0].split() == ["-c", "constraints.txt", "torch", "torchvision"], "torch goes in first, pinned"
    assert all("-c constraints.txt" in line for line in installs)
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split())
    assert "+cpu" not in pins["torch"], "the cluster image needs PyPI's CUDA build of torch"


def test_raycluster_runs_our_image_on_gpu_workers_with_credentials_from_secrets():
    (cluster,) = _docs("raycluster.yaml")
    secrets = {d["metadata"]["name"]: d for d in _docs("secrets.example.yaml")}
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must not take work from the GPU pool"
    gpu_groups = [
        g for g in groups if any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(g["template"]))
    ]
    assert gpu_groups, "a GPU worker group is required"
    for group in gpu_groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["rayStartParams"]["num-gpus"] == "1"
        tolerations = group["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    for template in [head["template"], *(g["template"] for g in groups)]:
        mounts = {v["name"]: v for v in template["spec"]["volumes"]}
        for container in _containers(template):
            assert container["image"] == _image()
            for source in container["envFrom"]:
                assert source["secretRef"]["name"] in secrets
            env = {e["name"]: e["value"] for e in container["env"]}
            assert env["RAY_AUTH_MODE"] == "token"
            token_mount = next(
                m for m in container["volumeMounts"] if env["RAY_AUTH_TOKEN_PATH"].startswith(m["mountPath"] + "/")
            )
            assert mounts[token_mount["name"]]["secret"]["secretName"] in secrets
    s3 = secrets[_containers(head["template"])[0]["envFrom"][0]["secretRef"]["name"]]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(s3["stringData"])


def test_rayjobs_target_the_raycluster_and_run_valid_entry_points():
    (cluster,) = _docs("raycluster.yaml")
    jobs = _docs("rayjobs.yaml")
    assert {entry_point(j["spec"]["entrypoint"])[0] for j in jobs} == {
        "pipelines.ingest",
        "pipelines.train",
        "pipelines.label",
    }
    for job in jobs:
        assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        module, args = entry_point(job["spec"]["entrypoint"])
        check_entry_point(module, args)


def test_entry_point_check_rejects_unknown_keys_and_missing_config_files():
    with pytest.raises(ValueError, match="no_such_key"):
        check_entry_point("pipelines.label", ["model=m", "data=d", "output=o", "no_such_key=1"])
    with pytest.raises(AssertionError, match="not in the repository"):
        check_entry_point("pipelines.train", ["--config", "/app/configs/nope.yaml", "data=d", "output=o"])


def test_cluster_launcher_config_has_gpu_workers_running_our_image():
    cfg = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "max_workers",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in cfg, key
    assert cfg["docker"]["image"] == _image()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0
    gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] <= cfg["max_workers"] for t in gpu)
    assert any("--gpus all" in o for o in cfg["docker"]["worker_run_options"])
    assert any("--metrics-export-port=8080" in c for c in cfg["head_start_ray_commands"])


def _registered_samples() -> dict[str, str]:
    """Every sample name the jobs can expose, mapped to its metric family."""
    train_metrics(), label_metrics(), ingest_metrics()
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {family.name + s: family.name for family in REGISTRY.collect() for s in suffixes[family.type]}


def test_prometheus_scrapes_the_ports_the_configs_and_manifests_use():
    cfg = yaml.safe_load((INFRA / "monitoring" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert len(jobs) == len(cfg["scrape_configs"])
    label_port = yaml.safe_load((REPO / "configs" / "label.yaml").read_text())["metrics_port"]
    label_targets = {int(t.rsplit(":", 1)[1]) for t in jobs["clustercam-label"]["static_configs"][0]["targets"]}
    assert {label_port, label_port + 1} <= label_targets, "driver and first actor of configs/label.yaml"
    train_targets = jobs["clustercam-train"]["static_configs"][0]["targets"]
    assert all(t.startswith("127.0.0.1:") for t in train_targets), "local jobs bind loopback only"
    (cluster,) = _docs("raycluster.yaml")
    declared = {
        p["name"] for g in cluster["spec"]["workerGroupSpecs"] for c in _containers(g["template"]) for p in c["ports"]
    }
    keep = [
        r
        for r in jobs["kubernetes-clustercam"]["relabel_configs"]
        if r.get("action") == "keep" and r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
    ]
    scraped = {name for name in declared if re.fullmatch(keep[0]["regex"], name)}
    assert {n for n in declared if n.startswith("cc-train")} <= scraped and {
        n for n in declared if n.startswith("cc-label")
    } <= scraped
    (train_job,) = [j for j in _docs("rayjobs.yaml") if "pipelines.train" in j["spec"]["entrypoint"]]
    port = int(re.search(r"metrics\.port=(\d+)", train_job["spec"]["entrypoint"]).group(1))
    assert "metrics.addr=0.0.0.0" in train_job["spec"]["entrypoint"], "pods are scraped from outside"
    assert port in {
        p["containerPort"]
        for g in cluster["spec"]["workerGroupSpecs"]
        for c in _containers(g["template"])
        for p in c["ports"]
    }


def test_grafana_dashboard_queries_only_registered_metrics_and_covers_the_mission():
    dash = json.loads((INFRA / "monitoring" / "grafana-dashboard.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    samples = _registered_samples()
    used = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\bclustercam_\w+", target["expr"]):
                assert name in samples, f"panel {panel['title']!r} queries {name}, which no job exposes"
                used.add(samples[name])
    for family in (
        "clustercam_train_samples",
        "clustercam_train_step_seconds",
        "clustercam_data_wait_seconds",
        "clustercam_train_loss",
        "clustercam_label_images",
        "clustercam_label_queue_depth",
    ):
        assert family in used, f"the dashboard lacks {family}"
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource"}


def test_job_runtime_env_ships_code_but_not_the_venv_or_outputs():
    env = yaml.safe_load((INFRA / "ray" / "job-runtime-env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".git", ".venv", ".demo"} <= set(env["excludes"])


def test_local_stack_scripts_call_the_stack_entry_point():
    for name, command in (("start.sh", "start"), ("stop.sh", "stop"), ("env.sh", "env")):
        text = (INFRA / "local" / name).read_text()
        assert f"-m pipelines.stack {command}" in text, name
        assert (INFRA / "local" / name).stat().st_mode & 0o111, f"{name} is not executable"
