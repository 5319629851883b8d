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
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Every test starts with TEST_THREADS, whatever ran before it: a command called in-process (e.g.
    `benchmarks.wire.main(["--threads", "2"])`) sets torch's process-wide count and leaves it, so a test's
    speed depended on which tests ran first."""
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(TEST_THREADS)


# Background tests (`@pytest.mark.background`): tests/background_commands.py, whose hooks and fixture pytest
# finds through these names.
from background_commands import (  # noqa: E402
    background,  # noqa: F401
    pytest_collection_finish,  # noqa: F401
    pytest_sessionfinish,  # noqa: F401
    run_background_tests_last,
)

pytest_plugins = ["pytester"]  # tests/infra/test_background.py runs small pytest sessions with those hooks


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
    tier (`make test-fast`: -m "not ray and not slow") never starts Ray. Background tests run last, when their
    command had the whole session to finish (the order of everything else is kept)."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.ray)
    run_background_tests_last(items)
