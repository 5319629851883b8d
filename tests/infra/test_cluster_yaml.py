"""cluster.yaml: valid for the installed Ray's cluster launcher, with the node types the platform needs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"


def ray_schema() -> dict:
    """The JSON schema shipped inside the installed Ray wheel (the one `ray up` validates against)."""
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_validates_against_rays_schema(cluster):
    jsonschema.validate(cluster, ray_schema())


def test_schema_check_is_not_vacuous(cluster):
    """A typo'd top-level key or a float resource must be caught by the same schema."""
    schema = ray_schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cluster, "setup_comands": []}, schema)
    broken = json.loads(json.dumps(cluster))
    next(iter(broken["available_node_types"].values()))["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_ray_accepts_it_after_filling_defaults(cluster):
    """What `ray up` does before touching the cloud: fill defaults, then Ray's own semantic checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))


def test_provider_is_aws_with_region_and_zone(cluster):
    provider = cluster["provider"]
    assert provider["type"] == "aws"
    assert re.fullmatch(r"[a-z]{2}-[a-z]+-\d", provider["region"])
    zones = provider["availability_zone"].split(",")
    assert zones and all(zone.startswith(provider["region"]) for zone in zones)


def test_head_is_a_declared_cpu_node_type(cluster):
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("GPU", 0) == 0


def test_gpu_worker_types_for_training_and_serving_autoscale_from_zero(cluster):
    types = cluster["available_node_types"]
    workers = {name: spec for name, spec in types.items() if name != cluster["head_node_type"]}
    gpu = {name: spec for name, spec in workers.items() if spec["resources"].get("GPU", 0) > 0}
    counts = sorted(spec["resources"]["GPU"] for spec in gpu.values())
    # A multi-GPU type for DDP training and a single-GPU type for serving replicas.
    assert counts[0] == 1 and counts[-1] >= 4, counts
    for name, spec in workers.items():
        assert spec.get("min_workers", 0) == 0, f"{name} should scale from zero"
        assert spec["max_workers"] >= 1, f"{name} can never start"
        assert spec["resources"].get("CPU", 0) >= 1, f"{name} declares no CPUs"
    # The global cap lets every worker type reach its own maximum.
    assert cluster["max_workers"] >= sum(spec["max_workers"] for spec in workers.values())


def test_a_cpu_worker_type_exists_for_data_preparation(cluster):
    types = cluster["available_node_types"]
    cpu_only = [
        name
        for name, spec in types.items()
        if name != cluster["head_node_type"] and spec["resources"].get("GPU", 0) == 0
    ]
    assert cpu_only, "no CPU worker type for jobs.prepare"


def test_every_node_runs_the_platform_image_and_the_project(cluster):
    image = cluster["docker"]["image"]
    rayjob = yaml.safe_load((ROOT / "platform" / "kuberay" / "rayjob.yaml").read_text())
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == image, "cluster.yaml and the KubeRay manifests must run the same image"
    assert "platform/Dockerfile" in CLUSTER_YAML.read_text()
    # The checkout is mounted and installed on every node (global setup_commands run on head and workers).
    mount = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    assert any("pip install" in cmd and mount in cmd for cmd in cluster["setup_commands"])
    for spec in cluster["available_node_types"].values():
        assert "worker_setup_commands" not in spec, "a per-type override would skip the global setup"


def test_shared_storage_and_mlflow_are_named_exactly_once(cluster):
    text = CLUSTER_YAML.read_text()
    mounts = [cmd for cmd in cluster["initialization_commands"] if " mount " in f" {cmd} "]
    assert len(mounts) == 1
    source = re.search(r"(\S+:/\S*)\s+(/\S+?)\)?$", mounts[0])
    assert source, mounts[0]
    storage, mount_point = source.group(1), source.group(2)
    assert text.count(storage) == 1, f"{storage} named more than once"
    # The mount reaches the containers at the same path, and the jobs are told where it is.
    assert f"{mount_point}:{mount_point}" in " ".join(cluster["docker"]["run_options"])
    env_line = next(cmd for cmd in cluster["setup_commands"] if "MLFLOW_TRACKING_URI=" in cmd)
    assert f"VLJEPA_STORAGE={mount_point}" in env_line
    tracking = re.search(r"MLFLOW_TRACKING_URI=(\S+)", env_line).group(1).strip("'")
    assert tracking.startswith("http") and text.count(tracking) == 1
    # Ray is started from a shell holding those variables, on the head and on every worker.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(cmd for cmd in cluster[key] if "ray start" in cmd)
        assert start.startswith("source ~/.vljepa_env"), start


def test_every_node_role_serve_and_train_ask_for_is_a_node_type(cluster):
    """serve/config.yaml's replicas and train.node_role name custom resources; some node type must declare each,
    with room for the replica's CPUs and GPUs, or the autoscaler would never start a node for them."""
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    types = {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}
    asked = {}
    for dep in config["applications"][0]["deployments"]:
        opts = dep.get("ray_actor_options", {})
        for role in opts.get("resources", {}):
            asked[role] = (opts.get("num_cpus", 1), opts.get("num_gpus", 0))
    assert {"encoder_node", "decoder_node"} <= set(asked), asked
    asked["train_node"] = (1, 1)  # a GPU training worker
    # The Ingress sits on the head: every Ray head declares node:__internal_head__ itself (no node type lists it).
    head = cluster["available_node_types"][cluster["head_node_type"]]["resources"]
    if (on_head := asked.pop("node:__internal_head__", None)) is not None:
        assert head.get("CPU", 0) >= on_head[0] and head.get("GPU", 0) >= on_head[1], (on_head, head)
    for role, (cpus, gpus) in asked.items():
        hosts = [
            name
            for name, spec in types.items()
            if spec["resources"].get(role, 0) >= 1
            and spec["resources"].get("CPU", 0) >= cpus
            and spec["resources"].get("GPU", 0) >= gpus
        ]
        assert hosts, f"no node type declares {role} with {cpus} CPU / {gpus} GPU"
    # Encoder and decoder on different nodes: the plan crosses the network, as the design says.
    assert not [name for name, spec in types.items() if {"encoder_node", "decoder_node"} <= set(spec["resources"])]
