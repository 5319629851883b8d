"""A real multi-node Ray cluster on this machine, shared by every test in tests/cluster/.

    head         CPU 1                      driver, GCS, Serve controller and proxy (HeadOnly), Tune functions
    encoder      CPU 2, encoder_node 1      Ingress replicas: HTTP + encoder (serve/config.yaml asks for encoder_node)
    decoder x2   CPU 2, decoder_node 1      PlanDecoder replicas (decoder_node), one per node
    train x2     CPU 2, train_node 1        Ray Train workers (train.node_role=train_node), one per node

Each node is its own raylet with its own object store (`ray.cluster_utils.Cluster`, Ray's own multi-node test
tool), the same roles as the node types of cluster.yaml and the worker groups of platform/kuberay/. The CPU
counts are exact: nothing here is padded to hide resources a finished job forgot to give back.

One process can be connected to one Ray cluster at a time, and the rest of the suite shares the single-node
`ray_local` instance. So the cluster tests run after every other test (`pytest_collection_modifyitems`
below) and the cluster fixture disconnects from `ray_local` before it starts.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# A dead node is declared dead after ~3 missed 1 s health checks instead of Ray's default ~30 s.
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}
ROLES: dict[str, dict[str, Any]] = {
    # 2 CPUs: the replica takes 1, and role-less actors (Tune functions) may land beside it.
    "encoder": {"num_cpus": 2, "resources": {"encoder_node": 1}},
    "decoder": {"num_cpus": 2, "resources": {"decoder_node": 1}},
    "train": {"num_cpus": 2, "resources": {"train_node": 1}},
}
LAYOUT = ("encoder", "decoder", "decoder", "train", "train")
HEAD_CPUS = 1
NODE_MEMORY = 150 * 1024 * 1024  # object store per node, Cluster's own default


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Cluster tests last: after them this process is no longer connected to the session's `ray_local`."""
    here = Path(__file__).resolve().parent
    items.sort(key=lambda item: Path(str(item.fspath)).resolve().is_relative_to(here))


@dataclass
class LocalCluster:
    """The running cluster and which raylet plays which role."""

    cluster: Any  # ray.cluster_utils.Cluster
    nodes: dict[str, list[Any]] = field(default_factory=dict)  # role -> [ray._private.node.Node]

    def node_ids(self, role: str) -> set[str]:
        return {node.node_id for node in self.nodes[role]}

    def add(self, role: str) -> Any:
        """Start one more raylet of this role (a replacement after a node loss) and wait until it is alive."""
        spec = ROLES[role]
        node = self.cluster.add_node(
            num_cpus=spec["num_cpus"], resources=dict(spec["resources"]), object_store_memory=NODE_MEMORY
        )
        self.nodes.setdefault(role, []).append(node)
        wait_resources(self.total())
        return node

    def remove(self, node: Any) -> None:
        """Kill a node's raylet and every worker on it, without a graceful drain: a machine lost."""
        for nodes in self.nodes.values():
            if node in nodes:
                nodes.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def total(self) -> dict[str, float]:
        """The resources the cluster should have: exact, from the layout."""
        out = {"CPU": float(HEAD_CPUS)}
        for role, nodes in self.nodes.items():
            spec = ROLES[role]
            out["CPU"] += spec["num_cpus"] * len(nodes)
            for key, value in spec["resources"].items():
                out[key] = out.get(key, 0.0) + value * len(nodes)
        return out


def wait_resources(expected: dict[str, float], timeout_s: float = 60.0, *, available: bool = False) -> None:
    """Wait until the cluster's (total or available) resources match `expected` on every named key."""
    import ray

    deadline = time.monotonic() + timeout_s
    seen: dict[str, float] = {}
    while time.monotonic() < deadline:
        seen = ray.available_resources() if available else ray.cluster_resources()
        if all(abs(seen.get(k, 0.0) - v) < 1e-6 for k, v in expected.items()):
            return
        time.sleep(0.25)
    kind = "available" if available else "total"
    raise AssertionError(f"{kind} resources { ({k: seen.get(k, 0.0) for k in expected}) } != {expected}")


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the single-node `ray_local` of the tests that ran before
        # Its Serve instance dies with it: ray.shutdown() stops the whole local instance this process started
        # (a graceful serve.shutdown() first took 5.2 s). Only this process's cached Serve client is dropped,
        # so the cluster tests' serve.start() makes a fresh one instead of reaching for the dead controller.
        from ray.serve.context import _set_global_client

        ray.shutdown()
        _set_global_client(None)
    temp_dir = tempfile.mkdtemp(prefix="vlc-")  # short: Unix socket paths live under it
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": HEAD_CPUS,
            "include_dashboard": False,
            "temp_dir": temp_dir,
            "_system_config": SYSTEM_CONFIG,
        },
    )
    local = LocalCluster(cluster)
    try:
        for role in LAYOUT:
            spec = ROLES[role]
            node = cluster.add_node(
                num_cpus=spec["num_cpus"], resources=dict(spec["resources"]), object_store_memory=NODE_MEMORY
            )
            local.nodes.setdefault(role, []).append(node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        wait_resources(local.total())
        yield local
    finally:
        # No serve.shutdown(): its graceful drain only delays killing the raylets below, and the cluster tests
        # run last, so nothing in this process talks to Serve afterwards.
        ray.shutdown()
        # Killed, not drained: removing the raylets gracefully one by one took ~7.5 s at the end of the session.
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node, allow_graceful=False)
        cluster.shutdown()  # the head
        shutil.rmtree(temp_dir, ignore_errors=True)
        # Nothing is started again for `ray_local`'s teardown: it skips when Ray is no longer initialised
        # (a serve.shutdown() there would otherwise ray.init() a fresh Ray or try the dead cluster's address).


def actor_nodes(class_name_part: str) -> list[str]:
    """Node ids of the live actors whose class name contains `class_name_part` (Serve replicas, Train workers)."""
    from ray._private.state import actors

    return [
        info["Address"]["NodeID"]
        for info in actors().values()
        if class_name_part in info.get("ActorClassName", "") and info.get("State") == "ALIVE"
    ]


@pytest.fixture(scope="session")
def cluster_shapes(local_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Run-0 shapes set prepared by Ray Data on the cluster, in a folder every node sees (one machine)."""
    from jobs.make_shapes import make_shapes
    from jobs.prepare import prepare

    raw = tmp_path_factory.mktemp("cluster-shapes-coco")
    make_shapes(raw, per_class=10, val_per_class=2, image_size=32, seed=0)
    out = tmp_path_factory.mktemp("cluster-shapes")
    for split in ("train", "val"):
        prepare(raw, split, out, image_size=32, image_format="png", shard_rows=64, progress=False)
    return out
