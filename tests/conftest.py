"""Shared fixtures: the repo root on sys.path, tiny COCO fixtures, one real local Ray per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests never join a user's cluster by accident, and Ray stays quiet and small.
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# torch's default intra-op thread count (the physical cores), before any test changes it.
STARTUP_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads():
    """Leave every test with the thread count the process started with. A command called in-process (e.g.
    `benchmarks.wire.main(["--threads", "1"])`) sets torch's process-wide count and leaves it: every later
    test, the Run-0 training included, then ran on one of the two cores."""
    yield
    torch.set_num_threads(STARTUP_THREADS)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance shared by the integration tests.

    8 logical CPUs on 2 cores: Ray Train V2 can leave a finished run's placement group reserved for a while
    (its PlacementGroupCleaner outlives the run), and with only 4 the next run's data tasks found no CPU.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reaches the session's Ray through any fixture is a Ray test, marked or not, so the fast
    tier (`make test-fast`: -m "not ray and not slow") never starts Ray."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.ray)
