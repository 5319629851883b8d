"""platform/: every file parses, carries the fields Ray and KubeRay require, and agrees with the rest of the repo."""

from __future__ import annotations

import ast
import json
import logging
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from model.config import load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[2]
PLATFORM = ROOT / "platform"
RAYJOB = PLATFORM / "kuberay" / "rayjob.yaml"
RAYSERVICE = PLATFORM / "kuberay" / "rayservice.yaml"
RUNTIME_ENV = PLATFORM / "runtime_env.yaml"
MLFLOW_COMPOSE = PLATFORM / "mlflow" / "docker-compose.yaml"
MLFLOW_K8S = PLATFORM / "mlflow" / "k8s.yaml"
SERVE_CONFIG = ROOT / "serve" / "config.yaml"

# What `ray job submit --working-dir .` must never upload, as paths relative to the repo root.
NOT_UPLOADED = [
    ".git/HEAD",
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    "data/coco/train2017/000000000009.jpg",
    "runs/seed_run2/checkpoint_000001/model.safetensors",
    "mlruns/0/meta.yaml",
    "mlartifacts/1/abc/artifacts/model.safetensors",
    "mlflow.db",
    "demo_out/report.md",
    "model/__pycache__/model.cpython-311.pyc",
    ".pytest_cache/v/cache/nodeids",
    ".ruff_cache/0.17.5/123",
    "vl_jepa_platform.egg-info/PKG-INFO",
]
# ...and what it must upload: the code, the configs, the tests and their fixtures.
UPLOADED = [
    "pyproject.toml",
    "constraints.txt",
    "model/model.py",
    "jobs/train.py",
    "jobs/data.py",
    "serve/config.yaml",
    "platform/runtime_env.yaml",
    "tests/fixtures/coco/annotations/captions_train2017.json",
    "tests/fixtures/coco/train2017/000000000009.jpg",
    "tests/jobs/test_data.py",
]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(args.split("=", 1) for kind, args in instructions if kind == "ARG" and "=" in args)


def mlflow_server_options() -> set[str]:
    """Every option the pinned `mlflow server` accepts, read from its click command."""
    from mlflow.cli import server

    return {opt for param in server.params for opt in (*param.opts, *param.secondary_opts)}


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def gpu_limit(group: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in group_containers(group))


def group_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def cpu_limit(group: dict) -> float:
    return sum(float(c["resources"]["limits"]["cpu"]) for c in group_containers(group))


# ---------------------------------------------------------------------------------------------------------------
# The folder as a whole


def test_every_file_in_platform_is_known_and_parses():
    files = sorted(p for p in PLATFORM.rglob("*") if p.is_file())
    assert files, "platform/ is empty"
    for path in files:
        rel = path.relative_to(ROOT)
        assert path.suffix != ".py" and path.name != "__init__.py", f"{rel}: platform/ holds no Python"
        if path.suffix in (".yaml", ".yml"):
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            assert docs and all(isinstance(d, dict) for d in docs), rel
        elif path.name == "Dockerfile":
            kinds = [kind for kind, _ in dockerfile_instructions(path)]
            assert "FROM" in kinds, rel
            assert set(kinds) <= {"ARG", "FROM", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}
        else:
            assert path.name == "README.md", f"{rel}: unexpected file (document it in platform/README.md)"
    readme = (PLATFORM / "README.md").read_text()
    for path in files:
        if path.name != "README.md":
            assert str(path.relative_to(PLATFORM)) in readme, f"platform/README.md does not explain {path.name}"


def test_one_image_name_everywhere():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    images = {cluster["docker"]["image"]}
    images |= {c["image"] for c in containers(yaml.safe_load(RAYJOB.read_text())["spec"]["rayClusterSpec"])}
    images |= {c["image"] for c in containers(yaml.safe_load(RAYSERVICE.read_text())["spec"]["rayClusterConfig"])}
    assert len(images) == 1, images
    (image,) = images
    build = f"docker build -f platform/Dockerfile -t {image} ."
    assert build in (PLATFORM / "Dockerfile").read_text() and build in (PLATFORM / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# Container images


def test_node_image_pins_the_versions_of_constraints():
    pins = constraints()
    steps = dockerfile_instructions(PLATFORM / "Dockerfile")
    args = dockerfile_args(steps)
    assert args["RAY_VERSION"] == pins["ray"]
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["MLFLOW_VERSION"] == pins["mlflow"]
    base = next(a for kind, a in steps if kind == "FROM")
    assert base.startswith("rayproject/ray:${RAY_VERSION}-py311-"), base
    assert args["CUDA_TAG"].startswith("cu") and args["TORCH_INDEX"].endswith("/" + args["CUDA_TAG"])
    runs = [a for kind, a in steps if kind == "RUN"]
    # torch comes from the CUDA index, at the pinned version; everything else through the constraints file.
    torch_step = next(r for r in runs if "torch==${TORCH_VERSION}" in r)
    assert "${TORCH_INDEX}" in torch_step and "-c constraints.txt" in torch_step
    assert any(re.search(r"pip install .*-c constraints\.txt \.$", r) for r in runs), "project not installed"
    assert any(kind == "COPY" and "constraints.txt" in a for kind, a in steps)
    for package in ("model", "jobs", "serve"):
        assert any(kind == "COPY" and a.split()[-2] == package for kind, a in steps), f"{package}/ not copied"
    # The build refuses to finish if the installed versions differ from these arguments.
    check = runs[-1]
    assert all(f"${{{name}}}" in check for name in ("RAY_VERSION", "TORCH_VERSION", "MLFLOW_VERSION"))
    assert "torch.version.cuda" in check


def test_every_pin_in_a_dockerfile_matches_constraints():
    pins = constraints()
    for path in PLATFORM.rglob("Dockerfile"):
        steps = dockerfile_instructions(path)
        args = dockerfile_args(steps)
        text = " ".join(a for _, a in steps)
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([^\s\"']+)", text):
            version = re.sub(r"\$\{(\w+)\}", lambda m, args=args: args[m.group(1)], version)
            if name.lower() in pins:
                assert version == pins[name.lower()], f"{path.relative_to(ROOT)}: {name}=={version}"
        if "mlflow==" in text:
            assert args["MLFLOW_VERSION"] == pins["mlflow"]


# ---------------------------------------------------------------------------------------------------------------
# runtime_env for `ray job submit --working-dir .`


@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return yaml.safe_load(RUNTIME_ENV.read_text())


def test_runtime_env_is_accepted_by_ray(runtime_env):
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**runtime_env)
    assert env.env_vars()["PYTHONUNBUFFERED"] == "1"
    assert all(isinstance(v, str) for v in env.env_vars().values()), "Ray wants string env vars"
    assert "working_dir" not in runtime_env, "the CLI's --working-dir . sets it"


def uploaded_files(root: Path, excludes: list[str], *, include_gitignore: bool) -> set[str]:
    """The files Ray's own packaging walk would put in the working_dir upload."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    found: set[str] = set()

    def handler(path: Path) -> None:
        if path.is_file():
            found.add(path.relative_to(root).as_posix())

    _dir_travel(root, [_get_excludes(root, excludes)], handler, include_gitignore=include_gitignore, logger=logging)
    return found


def test_runtime_env_excludes_data_checkpoints_mlflow_and_venvs(runtime_env, tmp_path):
    # Ray's matcher on a tree shaped like a working checkout, without .gitignore's help.
    for rel in NOT_UPLOADED + UPLOADED:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    uploaded = uploaded_files(tmp_path, runtime_env["excludes"], include_gitignore=False)
    assert uploaded == set(UPLOADED)


def test_working_dir_upload_of_this_checkout_is_small(runtime_env):
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    uploaded = uploaded_files(ROOT, runtime_env["excludes"], include_gitignore=True)
    assert {"pyproject.toml", "platform/runtime_env.yaml"} <= uploaded
    assert not any(rel.startswith((".git/", ".venv/")) for rel in uploaded)
    size = sum((ROOT / rel).stat().st_size for rel in uploaded)
    # Ray warns at half the limit; stay far below it so the upload is quick.
    assert size < GCS_STORAGE_MAX_SIZE // 4, f"{size / 2**20:.1f} MiB would be uploaded"


# ---------------------------------------------------------------------------------------------------------------
# KubeRay RayJob


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def test_rayjob_has_what_kuberay_requires(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayjob["metadata"]["name"])
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == constraints()["ray"]
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and group_containers(head)[0]["image"]
    ports = {p["containerPort"] for p in group_containers(head)[0]["ports"]}
    assert {6379, 8265} <= ports, "GCS and the dashboard (job server) must be exposed on the head"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group_containers(group):
            assert container["resources"]["limits"] == container["resources"]["requests"], "Ray sizes by limits"
    assert any(gpu_limit(g) > 0 for g in cluster["workerGroupSpecs"]), "no GPU worker group"


def test_rayjob_runtime_env_is_valid(rayjob):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)
    shared = yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"]
    assert env["env_vars"] == shared, "keep the job environment of platform/runtime_env.yaml"


def test_rayjob_entrypoint_is_a_valid_training_command(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.train"]
    rest = argv[3:]
    preset = rest[rest.index("--preset") + 1]
    data = rest[rest.index("--data") + 1]
    overrides = [a for a in rest if a.startswith("--") and a.split("=")[0] not in ("--preset", "--data")]
    assert preset == "seed_run2"
    cfg = load_config(preset, overrides)  # unknown keys or bad values raise here, not on the cluster
    assert cfg.train.use_gpu
    # The GPU groups can hold every Train worker, and data and checkpoints are on the shared volume.
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert sum(gpu_limit(g) * g["maxReplicas"] for g in groups) >= cfg.train.num_workers
    mounts = {m["mountPath"] for c in containers(rayjob["spec"]["rayClusterSpec"]) for m in c.get("volumeMounts", [])}
    assert any(data.startswith(m + "/") for m in mounts), data
    assert any(cfg.train.storage_path.startswith(m + "/") for m in mounts), cfg.train.storage_path
    assert set(parse_overrides(overrides)) >= {"train.storage_path", "train.use_gpu"}


def test_rayjob_driver_expects_the_autoscaler(rayjob):
    """jobs.train refuses GPU configs on a cluster without GPUs unless told that nodes come on demand."""
    tree = ast.parse((ROOT / "jobs" / "train.py").read_text())
    (name,) = [
        n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "AUTOSCALING_ENV" for t in n.targets)
    ]
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert all(g["minReplicas"] == 0 for g in cluster["workerGroupSpecs"] if gpu_limit(g) > 0)
    env = {e["name"]: e.get("value") for c in group_containers(cluster["headGroupSpec"]) for e in c.get("env", [])}
    assert env.get(name) == "1", f"the head (where the driver runs) needs {name}=1"


def test_rayjob_workers_see_the_mlflow_server(rayjob):
    train_groups = [g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"] if gpu_limit(g) > 0]
    service = yaml_docs(MLFLOW_K8S, "Service")[0]["metadata"]
    for group in train_groups:
        env = {e["name"]: e.get("value") for c in group_containers(group) for e in c.get("env", [])}
        host = urlsplit(env["MLFLOW_TRACKING_URI"]).hostname
        assert host == f"{service['name']}.{service['namespace']}.svc.cluster.local"


# ---------------------------------------------------------------------------------------------------------------
# KubeRay RayService


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def test_rayservice_serves_exactly_the_applications_of_serve_config(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["kind"] == "RayService"
    served = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    wanted = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    block = "\n".join("    " + line for line in yaml.safe_dump({"applications": wanted}, sort_keys=False).splitlines())
    assert served["applications"] == wanted, (
        "platform/kuberay/rayservice.yaml is out of sync with serve/config.yaml; "
        f"replace the applications in serveConfigV2 with:\n{block}"
    )


def test_rayservice_serve_config_is_valid_for_serve_on_kubernetes(rayservice):
    from ray.serve.schema import ServeDeploySchema

    served = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    # Kubernetes Services reach the proxy on the pod IP; a loopback bind would make the service unreachable.
    assert served["http_options"]["host"] == "0.0.0.0"
    # ...and then the bearer token is mandatory, from a Secret on every pod.
    cluster = rayservice["spec"]["rayClusterConfig"]
    for container in containers(cluster):
        env = {e["name"]: e for e in container.get("env", [])}
        assert "secretKeyRef" in env["VLJEPA_API_KEY"]["valueFrom"]
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://")
    for app in served["applications"]:
        module, attr = app["import_path"].split(":")
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert attr in defined, f"{app['import_path']} does not exist"


def declared_resources(group: dict) -> dict[str, float]:
    """The custom resources a worker group's pods declare: rayStartParams.resources, a JSON object in a string."""
    raw = group.get("rayStartParams", {}).get("resources")
    if not raw:
        return {}
    value = json.loads(raw.strip())
    return json.loads(value) if isinstance(value, str) else value


HEAD_RESOURCE = "node:__internal_head__"  # every Ray head node declares it


def test_rayservice_has_room_for_every_replica(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == constraints()["ray"]
    assert "rayStartParams" in cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    served = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    for app in served["applications"]:
        for dep in app["deployments"]:
            opts = dep.get("ray_actor_options", {})
            cpus, gpus = opts.get("num_cpus", 1), opts.get("num_gpus", 0)
            roles = opts.get("resources", {})
            if HEAD_RESOURCE in roles:  # pinned to the head: it must fit the Ray CPUs the head declares (0 here)
                head = cluster["headGroupSpec"]
                head_cpus = float(head["rayStartParams"].get("num-cpus", cpu_limit(head)))
                assert cpus <= head_cpus and gpus == 0, f"{dep['name']} asks {cpus} CPU of the head's {head_cpus}"
                continue
            fits = [
                g
                for g in groups
                if cpu_limit(g) >= cpus
                and gpu_limit(g) >= gpus
                and g["maxReplicas"] > 0
                and all(declared_resources(g).get(role, 0) >= n for role, n in roles.items())
            ]
            assert fits, f"no worker group can hold a {dep['name']} replica ({cpus} CPU, {gpus} GPU, {roles})"
    assert any(gpu_limit(g) > 0 for g in groups), "no GPU group for GPU replicas"


# ---------------------------------------------------------------------------------------------------------------
# MLflow tracking server recipes


def yaml_docs(path: Path, kind: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == kind]


def check_mlflow_server_args(args: list[str]) -> dict[str, str]:
    """Every flag exists in the pinned `mlflow server`; returns them as a mapping."""
    options = mlflow_server_options()
    parsed = {}
    for arg in args:
        flag, _, value = arg.partition("=")
        assert flag in options, f"`mlflow server` has no option {flag}"
        parsed[flag] = value
    assert parsed["--artifacts-destination"].startswith("s3://")
    assert parsed["--host"] == "0.0.0.0"
    assert "--serve-artifacts" in parsed
    return parsed


def test_compose_recipe_runs_a_reachable_mlflow_server():
    from mlflow.server.security_utils import is_allowed_host_header

    compose = yaml.safe_load(MLFLOW_COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "mlflow"} <= set(services)
    mlflow = services["mlflow"]
    assert (MLFLOW_COMPOSE.parent / mlflow["build"] / "Dockerfile").is_file()
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    parsed = check_mlflow_server_args(mlflow["command"])
    assert parsed["--backend-store-uri"].startswith("postgresql://")
    assert "@postgres:5432/" in parsed["--backend-store-uri"]
    # The URI every node of cluster.yaml uses passes the server's Host-header guard.
    cluster = (ROOT / "cluster.yaml").read_text()
    tracking = urlsplit(re.search(r"MLFLOW_TRACKING_URI=(\S+)", cluster).group(1).strip("'"))
    assert f"{tracking.port}:{tracking.port}" in mlflow["ports"][0]
    assert is_allowed_host_header(parsed["--allowed-hosts"].split(","), tracking.netloc)


def test_k8s_recipe_runs_a_reachable_mlflow_server():
    from mlflow.server.security_utils import is_allowed_host_header

    deployment = yaml_docs(MLFLOW_K8S, "Deployment")[0]
    service = yaml_docs(MLFLOW_K8S, "Service")[0]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    parsed = check_mlflow_server_args(container["args"])
    # The database URI (with its password) comes from a Secret, expanded by Kubernetes as $(VAR).
    var = re.fullmatch(r"\$\((\w+)\)", parsed["--backend-store-uri"]).group(1)
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env[var]["valueFrom"]
    assert "postgresql://" in MLFLOW_K8S.read_text()
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] in port_names
    assert port_names[svc_port["targetPort"]] == int(parsed["--port"])
    # The KubeRay manifests' URI resolves to this Service and passes the Host-header guard.
    for manifest in (RAYJOB, RAYSERVICE):
        for uri in set(re.findall(r"value: (http://\S+)", manifest.read_text())):
            url = urlsplit(uri)
            assert url.hostname.startswith(f"{service['metadata']['name']}.{service['metadata']['namespace']}.")
            assert url.port == svc_port["port"]
            assert is_allowed_host_header(parsed["--allowed-hosts"].split(","), url.netloc)
