"""Sweeps on the multi-node cluster with exact resources: ASHA stops the losing trial early, and the stopped
trial gives back everything it held. It is the suite's one ASHA sweep, so it also checks which trial is stopped
and after which epoch.

Regression test for ray-project/ray#54305 as it hit jobs.sweep: the stopped trial's Train worker group kept its
placement group (CPUs and a train_node) until the driver exited, because Ray's cleaner needs the dashboard.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.sweep import main, orphaned_groups
from tests.cluster.conftest import LocalCluster, wait_resources

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(300)  # before the fix a later trial could wait forever for the stranded group
def test_asha_stopped_trial_leaves_no_placement_group(local_cluster: LocalCluster, cluster_shapes: Path, tmp_path):
    import ray
    from ray.util import placement_group_table

    space = tmp_path / "space.json"
    overrides = {
        "data.num_samples": 36,
        "train.batch_size": 8,
        "train.eval_samples": 1,
        "train.keep_checkpoints": 1,
        "train.epochs": 2,  # ASHA's one rung (epoch 1) stops the near-frozen trial; the other completes epoch 2
        "train.node_role": "train_node",  # the workers hold a train node's role unit too
        "tracking.enabled": False,
    }
    # One at a time, in order: the learning trial sets rung 1, the near-frozen one is worse and is stopped last,
    # so its group is what is left when the sweep ends.
    space.write_text(json.dumps({"base_preset": "debug", "overrides": overrides, "grid": {"train.lr": [3e-3, 1e-7]}}))
    storage = tmp_path / "runs"
    argv = ["--space", str(space), "--data", str(cluster_shapes), "--storage", str(storage), "--name", "exact"]
    argv += ["--grace-period=1", "--reduction-factor=2", "--max-concurrent=1", "--trial-cpus=0.5", "--data-cpus=0.5"]
    assert main([*argv, "--eval-max-images=18"]) == 0

    # ASHA decides once, at epoch 1 (the rung below the last epoch), against the cutoff of the val_ce already
    # recorded there (reduction factor 2: their median). Run in order, the learning trial records first and
    # trains both epochs; the near-frozen one is always worse at the rung, so it is stopped after epoch 1.
    rows = {r["train.lr"]: r for r in json.loads((storage / "exact" / "report" / "rows.json").read_text())}
    assert set(rows) == {3e-3, 1e-7}, rows
    assert rows[3e-3]["status"] == "completed" and rows[3e-3]["epochs"] == 2, rows
    assert rows[1e-7]["status"] == "stopped at 1/2" and rows[1e-7]["epochs"] == 1, rows
    assert not orphaned_groups()
    alive = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
    assert not alive, alive
    # Every CPU and role unit is free again: the cluster's exact totals, nothing padded.
    wait_resources(local_cluster.total(), available=True, timeout_s=30)
    assert ray.available_resources().get("train_node") == local_cluster.total()["train_node"]
