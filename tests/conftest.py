"""Shared fixtures: the repo root on sys.path, tiny COCO fixtures, one real local Ray per session."""

from __future__ import annotations

import os
import shutil
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
# Ray Train's controller polls its workers every 2 s: a report waits in a one-slot queue until the next poll and
# the end of a fit is seen up to 2 s late, in every one of the suite's ~30 fits. Polling every 0.25 s: a tiny
# 1-worker fit took 37 s instead of 48 s (one sample each, load average 6-10, 2026-11-30).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# One intra-op thread in the test process: it shares the 2 cores with the session's Ray processes, and two
# threads then spin against each other (60 Run-0 steps: 14 s on one thread, 109 s on two with another process
# busy). Ray Train workers and Serve replicas set their own counts.
TEST_THREADS = 1
# A test marked `solo` runs first in the session (pytest_collection_modifyitems), while the test process is the
# only one working, and gets both cores: the Run-0 test took 115 s on two threads instead of 202 s on one
# (`benchmarks.run0 --steps 125 --eval-every 125 --train.epochs=5`: 20 s vs 32 s, load 0.3).
SOLO_THREADS = 2
torch.set_num_threads(TEST_THREADS)


def _children_alive() -> list[int]:
    """Pids of this process's live descendants (Ray's raylet, GCS, workers, a subprocess a test left), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        found += sorted(frontier)
    return found


def _alone() -> bool:
    """True when nothing this session started is still running: no Ray in this process, no child process.
    Two torch threads are only faster while no other process of ours competes for the 2 cores (with one busy,
    60 Run-0 steps took 109 s instead of 14 s), so a solo test that finds one (a plugin reordered the tests, a
    conftest started Ray at import) keeps one thread: slower, and on another float trajectory."""
    ray = sys.modules.get("ray")
    return not (ray is not None and ray.is_initialized()) and not _children_alive()


@pytest.fixture(autouse=True)
def _torch_threads(request: pytest.FixtureRequest):
    """Every test starts with TEST_THREADS, whatever ran before it: a command called in-process (e.g.
    `benchmarks.wire.main(["--threads", "2"])`) sets torch's process-wide count and leaves it, so a test's
    speed depended on which tests ran first. A `solo` test gets SOLO_THREADS when nothing else of ours runs."""
    solo = request.node.get_closest_marker("solo") is not None and _alone()
    torch.set_num_threads(SOLO_THREADS if solo else TEST_THREADS)
    yield
    torch.set_num_threads(TEST_THREADS)


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
    if not ray.is_initialized():  # the cluster tests (tests/cluster/conftest.py) already shut it down
        return
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store made once: opening a database without MLflow's tables runs every schema
    migration (~2.3 s here), which each test's store used to repeat."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("mlflow-template")
    store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlartifacts").as_uri())
    store.engine.dispose()
    return folder / "mlflow.db"


@pytest.fixture(scope="session")
def mlflow_store(_mlflow_template):
    """`mlflow_store(path)` -> "sqlite:///path": a fresh, empty MLflow store at `path` (a copy of the template)."""

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_mlflow_template, path)
        return f"sqlite:///{path}"

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reaches the session's Ray through any fixture is a Ray test, marked or not, so the fast
    tier (`make test-fast`: -m "not ray and not slow") never starts Ray. `solo` tests run first, before any
    test has started Ray or a subprocess (the order of everything else is kept)."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.ray)
    items.sort(key=lambda item: item.get_closest_marker("solo") is None)  # stable: only the solo tests move
