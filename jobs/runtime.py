"""Starting or joining Ray on purpose: the one place jobs/ and serve/ start Ray.

A bare `ray.init()` joins whatever cluster `/tmp/ray/ray_current_cluster` names, even a
dead one. Jobs and the Serve demo therefore start their own local instance unless the user
points them at a cluster with `RAY_ADDRESS` (which `ray job submit` sets for the driver).
"""

from __future__ import annotations

import logging
import os

import ray

from jobs import console

log = logging.getLogger(__name__)


def ensure_ray(
    num_cpus: int | None = None, *, namespace: str | None = None, resources: dict[str, float] | None = None
) -> str:
    """Join `RAY_ADDRESS` if set, reuse an initialised Ray, else start a fresh local instance.

    resources: custom resources of the local node (Serve's node roles); ignored when joining a cluster.
    Returns a short description of what was joined, for the job's console output.
    """
    if ray.is_initialized():
        return "existing Ray connection"
    address = os.environ.get("RAY_ADDRESS", "").strip()
    # Worker output streams here only in verbose mode; otherwise it stays in the Ray session's log folder.
    kwargs: dict = {"log_to_driver": console.log_to_driver(), "namespace": namespace}
    if address:
        ray.init(address=address, **kwargs)
        return f"Ray cluster at {address}"
    ray.init(
        address="local",
        num_cpus=num_cpus if num_cpus is not None else local_cpus(),
        resources=resources,
        include_dashboard=False,
        **kwargs,
    )
    return "a new local Ray instance"


def local_cpus() -> int:
    """Logical CPUs for a local instance: at least 4, so 2 train workers plus data tasks fit on 2 cores."""
    return max(4, os.cpu_count() or 1)


def free_resources() -> dict[str, float]:
    """What the joined cluster has free now: totals minus what running work (another job, a sweep) holds."""
    total, free = ray.cluster_resources(), ray.available_resources()
    return {key: min(float(total[key]), float(free.get(key, 0.0))) for key in total}
