"""Starting or joining Ray on purpose: the one place jobs/ and serve/ start Ray.

A bare `ray.init()` joins whatever cluster `/tmp/ray/ray_current_cluster` names, even a
dead one. Jobs and the Serve demo therefore start their own local instance unless the user
points them at a cluster with `RAY_ADDRESS` (which `ray job submit` sets for the driver).

The embedded local instance is for this machine only: its node address is the loopback
interface, so GCS, raylet, object manager and metrics exporter listen on 127.0.0.1, not on
every interface (see `LOCAL_NODE_IP`). Ray's token authentication, when the environment
enables it, is left as it is. A cluster joined through RAY_ADDRESS keeps its own addresses.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray
import ray._private.ray_constants as ray_constants

from jobs import console

log = logging.getLogger(__name__)
LOCAL_NODE_IP = "127.0.0.1"  # the embedded instance's node address: its servers listen on loopback only


def ensure_ray(
    num_cpus: int | None = None,
    *,
    namespace: str | None = None,
    resources: dict[str, float] | None = None,
    log_to_driver: bool | None = None,
) -> str:
    """Join `RAY_ADDRESS` if set, reuse an initialised Ray, else start a fresh local instance.

    resources: custom resources of the local node (Serve's node roles); ignored when joining a cluster.
    log_to_driver: stream worker output to this process; default: only in the console's verbose mode.
    Returns a short description of what was joined, for the job's console output.
    """
    if ray.is_initialized():
        return "existing Ray connection"
    address = os.environ.get("RAY_ADDRESS", "").strip()
    # Worker output streams here only in verbose mode; otherwise it stays in the Ray session's log folder.
    if log_to_driver is None:
        log_to_driver = console.log_to_driver()
    kwargs: dict = {"log_to_driver": log_to_driver, "namespace": namespace}
    if address:
        ray.init(address=address, **kwargs)
        return f"Ray cluster at {address}"
    with _loopback_node_address():
        ray.init(
            address="local",
            num_cpus=num_cpus if num_cpus is not None else local_cpus(),
            resources=resources,
            include_dashboard=False,
            _node_ip_address=LOCAL_NODE_IP,
            **kwargs,
        )
    return "a new local Ray instance"


@contextlib.contextmanager
def _loopback_node_address() -> Iterator[None]:
    """Let `_node_ip_address="127.0.0.1"` stand while the local instance starts.

    ray.init rewrites a loopback node address to the machine's outward interface
    (`services.resolve_ip_for_localhost`), except where Ray treats the machine as single-node only
    (macOS and Windows: `ray_constants.ENABLE_RAY_CLUSTER` false, $RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER).
    That single-node behaviour is what an embedded instance wants on Linux too, for its start only.
    """
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def local_cpus() -> int:
    """Logical CPUs for a local instance: at least 4, so 2 train workers plus data tasks fit on 2 cores."""
    return max(4, os.cpu_count() or 1)


def free_resources() -> dict[str, float]:
    """What the joined cluster has free now: totals minus what running work (another job, a sweep) holds."""
    total, free = ray.cluster_resources(), ray.available_resources()
    return {key: min(float(total[key]), float(free.get(key, 0.0))) for key in total}
