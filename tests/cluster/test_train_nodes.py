"""Training across nodes: two Ray Train workers on two train nodes, one node lost mid-run.

The data and the checkpoint storage are both given as `file://` URIs of folders every node sees, the way an
`s3://` or `gs://` bucket is given on a real cluster: jobs/storage.py resolves them to a pyarrow filesystem
for the driver's checks, Ray Data's read tasks on the train nodes and Ray Train's checkpoints.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from jobs import train
from model.config import load_config
from tests.cluster.conftest import LocalCluster, actor_nodes, wait_resources

pytestmark = [pytest.mark.ray, pytest.mark.slow]
EPOCHS = 3
ARGS = [
    "--train.num_workers=2",
    "--train.node_role=train_node",  # one worker per train node: the two workers are on two nodes
    f"--train.epochs={EPOCHS}",
    "--train.batch_size=8",
    "--train.eval_samples=1",
    "--train.keep_checkpoints=1",
    "--train.max_failures=3",
    "--tracking.enabled=false",
]


def registered_checkpoint(run: Path) -> bool:
    """Whether Ray Train's controller has registered a checkpoint of this run as the one to restore from.

    A `checkpoint_*` folder appears on storage while its files are still being uploaded, before the controller
    records it; a node lost in that window correctly restarts from scratch. The controller writes its
    checkpoint-manager snapshot only after registering, so that file naming a latest checkpoint is the signal.
    """
    snapshot = run / "checkpoint_manager_snapshot.json"
    try:
        state = json.loads(snapshot.read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False
    return bool(state.get("latest_checkpoint_result"))


def test_node_role_needs_units_on_the_cluster(local_cluster):
    cfg = load_config("debug", [*ARGS, "--train.num_workers=3"])
    with pytest.raises(train.PreflightError, match="train_node"):
        train.check_cluster(cfg)


def test_two_nodes_train_and_a_lost_node_resumes_from_the_last_checkpoint(
    local_cluster: LocalCluster, cluster_shapes: Path, tmp_path: Path, capsys
):
    storage = tmp_path / "shared-runs"
    run = storage / "two-nodes"
    seen: dict[str, object] = {}

    # Everything free first: a group an earlier test left behind would otherwise make the restart wait forever.
    wait_resources(local_cluster.total(), available=True, timeout_s=60)
    # The replacement joins before the loss: a raylet can only be started from the main thread (signal handlers).
    seen["replacement"] = local_cluster.add("train").node_id

    def lose_a_node() -> None:
        """Once epoch 1's checkpoint is registered (epoch 2 is running): kill the node of one worker."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not registered_checkpoint(run):
            time.sleep(0.1)
        workers = actor_nodes("RayTrainWorker")
        seen["before"] = workers
        victim = next((n for n in local_cluster.nodes["train"] if n.node_id in workers), None)
        if victim is None:
            return
        seen["killed"] = victim.node_id
        local_cluster.remove(victim)
        while time.monotonic() < deadline:  # the restarted group, on the survivor and the replacement
            workers = actor_nodes("RayTrainWorker")
            if len(workers) == 2 and seen["killed"] not in workers:
                seen["after"] = workers
                return
            time.sleep(0.2)

    cfg = load_config("debug", ARGS)
    chaos = threading.Thread(target=lose_a_node, daemon=True)
    chaos.start()
    started = time.perf_counter()
    data = cluster_shapes.as_uri()
    result = train.run_training(cfg, data, run_name="two-nodes", storage_path=storage.as_uri())
    elapsed = time.perf_counter() - started
    chaos.join(timeout=30)

    before, after = seen.get("before"), seen.get("after")
    assert before and len(set(before)) == 2 and set(before) <= {seen["killed"], *local_cluster.node_ids("train")}
    assert after and len(set(after)) == 2 and seen["killed"] not in after
    assert set(after) <= local_cluster.node_ids("train")  # the survivor and the spare that joined
    assert result.metrics["epoch"] == EPOCHS  # finished, with the right epoch count
    # The new worker group restored the last checkpoint on storage: it started after epoch 1, not from scratch.
    assert 2 <= result.metrics["start_epoch"] <= EPOCHS
    assert result.mlflow_run_id is None and result.model_uri is None  # tracking.enabled=false: no MLflow at all
    assert result.storage_path.startswith("file://")
    assert result.checkpoint_dir and Path(result.checkpoint_dir.removeprefix("file://")).is_relative_to(storage)
    assert (Path(result.checkpoint_dir.removeprefix("file://")) / "model.safetensors").exists()
    wait_resources(local_cluster.total(), available=True, timeout_s=60)  # nothing held after the run
    with capsys.disabled():
        print(
            f"\n[cluster] 2 workers on 2 nodes, one node lost after the first checkpoint: the new group started at "
            f"epoch {result.metrics['start_epoch']}, finished epoch {EPOCHS}; {elapsed:.0f} s in all"
        )
