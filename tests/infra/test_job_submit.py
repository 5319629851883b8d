"""`ray job submit --working-dir .` against a real Ray head, as on a cluster.

The test starts its own head (`ray start --head --block` on loopback, its own ports and temp dir), submits
the README's prepare and train commands with platform/runtime_env.yaml, and stops exactly the processes
that head started. It never runs `ray stop`, which would kill every Ray on the machine, including the
session's `ray_local`. This proves the working-dir upload, the imports from the uploaded copy (platform/
must not shadow the standard library there), the runtime_env and MLflow all behave under job submission.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
COCO_FIXTURE = ROOT / "tests" / "fixtures" / "coco"
RAY = shutil.which("ray", path=str(VENV_BIN)) or "ray"
STARTUP_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def head_env(token_path: Path) -> dict[str, str]:
    """The head's environment: this venv's `python` first on PATH (job entrypoints say `python`), no RAY_ADDRESS,
    and Ray's token authentication (on by default in 2.60) with a token of our own instead of ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    # `ray start --block` stops its processes at once on SIGTERM instead of first draining the node for up to
    # 30 s (a Kubernetes pod's graceful hand-over, nothing this test checks; stop_head below)
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    env.pop("PYTHONPATH", None)  # the job must import the project from its uploaded working dir
    return env


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ..., starttime at index 19)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_tree(root_pid: int, marker: str) -> dict[int, str]:
    """{pid: start time} of root_pid's descendants, plus any process whose command line names our temp dir."""
    stats: dict[int, list[str]] = {}
    found = {root_pid}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (stat := _stat(int(entry.name))) is None:
            continue
        pid = int(entry.name)
        stats[pid] = stat
        with contextlib.suppress(OSError):
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.add(pid)
    ancestors, pid = set(), os.getpid()
    while pid in stats and pid not in ancestors:  # never this test process or what runs it
        ancestors.add(pid)
        pid = int(stats[pid][1])
    found -= ancestors
    grew = True
    while grew:
        children = {pid for pid, stat in stats.items() if int(stat[1]) in found} - found
        found |= children
        grew = bool(children)
    return {pid: stats[pid][19] for pid in found if pid in stats}


def stop_head(proc: subprocess.Popen, marker: str) -> None:
    """Stop every process this head started (the job drivers too); nothing else.

    `ray start --block` first, alone: its SIGTERM handler stops its processes, raylet first (with no drain:
    head_env). Signalled all at once, `ray start`, its raylet, GCS, autoscaler monitor and runtime-env agent
    were all still alive after 5 s, every time (the suite's 5 s teardown); after the jobs ran, a drain of up to
    30 s kept `ray start` alone from finishing within 10 s. Then SIGTERM, then SIGKILL, whatever is left. A pid
    is signalled only while its start time is the one recorded, so a recycled pid is never hit.
    """
    procs = process_tree(proc.pid, marker)
    # (only this pid, or every one left; signal; how long to wait for the whole tree to go)
    rounds = [(proc.pid, signal.SIGTERM, 10.0), (None, signal.SIGTERM, 5.0), (None, signal.SIGKILL, 5.0)]
    for only, sig, wait_s in rounds:
        for pid, started in procs.items():
            if only in (None, pid) and (stat := _stat(pid)) is not None and stat[19] == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reap `ray start` itself
            procs = {p: t for p, t in procs.items() if (st := _stat(p)) is not None and st[19] == t and st[0] != "Z"}
            if not procs:
                return
            time.sleep(0.2)


@dataclass
class Head:
    url: str  # the dashboard: job submission goes here
    token_path: Path

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on loopback with the dashboard's job server."""
    # Short path: Ray's Unix sockets live under the temp dir and must fit in 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="vljepa-ray-", dir="/tmp")
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    cmd = [
        RAY, "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={256 * 2**20}",
        "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        cmd, cwd=temp_dir, env=head_env(token_path), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    head = Head(f"http://127.0.0.1:{dash}", token_path)
    url = head.url
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"ray start exited with {proc.returncode}:\n{(Path(temp_dir) / 'ray-start.log').read_text()}"
                )
            try:
                request = urllib.request.Request(f"{url}/api/version", headers=head.auth())
                with urllib.request.urlopen(request, timeout=2):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the dashboard at {url} did not come up in {STARTUP_TIMEOUT_S}s")
            time.sleep(0.5)
        yield head
    finally:
        stop_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head: Head, *entrypoint: str) -> subprocess.CompletedProcess:
    """The README's command, from the repo root; RAY_ADDRESS and the token only in this subprocess's environment."""
    url = head.url
    env = head_env(head.token_path)
    env["RAY_ADDRESS"] = url
    cmd = [RAY, "job", "submit", "--address", url, "--working-dir", ".", "--runtime-env", "platform/runtime_env.yaml"]
    return subprocess.run(
        [*cmd, "--", *entrypoint], cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )


def test_prepare_then_train_submitted_as_jobs(ray_head, tmp_path, mlflow_store):
    # The README's real-COCO commands on the COCO-layout fixture (8 JPEGs, captions and instances JSON): the
    # suite's one training on COCO data (two workers on an uneven split: the shared runs of tests/jobs/test_train.py).
    # Absolute paths outside the job's copy of the working dir: the fixture is read where it is.
    prepared, runs = tmp_path / "prepared", tmp_path / "runs"
    tracking_uri = mlflow_store(tmp_path / "mlflow.db")

    started = time.monotonic()
    proc = submit(
        ray_head, "python", "-m", "jobs.prepare",
        "--coco-root", str(COCO_FIXTURE), "--split", "train2017", "--out", str(prepared), "--image-size", "16",
        "--shard-rows", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (prepared / "train2017" / "manifest.json").is_file()
    assert len(list((prepared / "train2017").glob("*.parquet"))) == 3  # 8 rows in shards of 3
    print(f"prepare job: {time.monotonic() - started:.1f}s")

    started = time.monotonic()
    proc = submit(
        ray_head, "python", "-m", "jobs.train", "--preset", "debug", "--data", str(prepared),
        "--data.train_split=train2017", "--data.val_fraction=0.3",
        "--train.epochs=1", "--train.num_workers=1", "--train.batch_size=2", "--train.run_name=submitted",
        f"--train.storage_path={runs}", f"--tracking.tracking_uri={tracking_uri}",
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    print(f"train job: {time.monotonic() - started:.1f}s")
    assert proc.returncode == 0, out
    assert re.search(r"train: run submitted finished at epoch 1\b", out), out
    assert "succeeded" in out

    # The job really ran from an uploaded working dir, with platform/runtime_env.yaml's settings.
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head.url, headers=ray_head.auth())
    jobs = [j for j in client.list_jobs() if "jobs.train" in j.entrypoint]
    assert len(jobs) == 1 and jobs[0].status == JobStatus.SUCCEEDED
    runtime_env = jobs[0].runtime_env
    assert runtime_env["working_dir"].startswith("gcs://_ray_pkg_"), runtime_env
    assert runtime_env["excludes"] == yaml.safe_load((ROOT / "platform" / "runtime_env.yaml").read_text())["excludes"]

    # Its results landed where the command said: checkpoints in storage, a registered model in MLflow.
    assert list((runs / "submitted").rglob("model.safetensors")), "no checkpoint written"
    from mlflow import MlflowClient

    versions = MlflowClient(tracking_uri=tracking_uri).search_model_versions("name='vl-jepa-captioner'")
    assert len(versions) == 1 and versions[0].status == "READY"
