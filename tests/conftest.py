"""Shared fixtures: the repo root on sys.path, tiny COCO fixtures, one real local Ray per session."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------
# Background tests: `@pytest.mark.background(module, *args)` runs `python -m module *args` in a child process
# started when collection ends, at the lowest CPU priority, while the rest of the session runs; the test itself
# runs last and checks what the command left ("{out}" in an argument is the command's own output folder).
# The session's Ray tests keep 0.4-0.8 of the two cores idle on average (process start-up, polls, HTTP
# round trips); a single-threaded CPU-bound command at nice 19 takes that idle time and yields to everything
# else. The Run-0 quality test is one: ~200 s of training on one thread that used to run alone.
BACKGROUND_NICE = 19
BACKGROUND_WAIT_S = 540  # the longest a background test waits for its command (under pytest-timeout's 600 s)


@dataclass
class BackgroundRun:
    """A background test's command: its process, output folder and log (stdout and stderr together)."""

    argv: list[str]
    proc: subprocess.Popen
    out: Path
    log: Path

    def finish(self, timeout: float) -> int:
        """Wait for the command (killed after `timeout` s) and return its exit status."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


_BACKGROUND = pytest.StashKey[BackgroundRun]()


def _start_background(item: pytest.Item, marker: pytest.Mark) -> BackgroundRun:
    out = Path(tempfile.mkdtemp(prefix=f"bg-{item.name[:40]}-"))
    argv = [sys.executable, "-m", *(str(a).format(out=out) for a in marker.args)]
    log = out / "command.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
        )
    with contextlib.suppress(ProcessLookupError):  # the command already ended: its exit status says why
        os.setpriority(os.PRIO_PROCESS, proc.pid, BACKGROUND_NICE)
    return BackgroundRun(argv, proc, out, log)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the command of every selected background test (none under --collect-only)."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        marker = item.get_closest_marker("background")
        if marker is not None:
            item.stash[_BACKGROUND] = _start_background(item, marker)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop a background command whose test never ran (-x, an interrupt) and remove its output folder."""
    for item in session.items:
        run = item.stash.get(_BACKGROUND, None)
        if run is None:
            continue
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        shutil.rmtree(run.out, ignore_errors=True)


@pytest.fixture
def background(request: pytest.FixtureRequest) -> BackgroundRun:
    """The test's finished background command (started now if collection did not start it)."""
    marker = request.node.get_closest_marker("background")
    assert marker is not None, "the `background` fixture belongs to a test marked @pytest.mark.background(...)"
    run = request.node.stash.get(_BACKGROUND, None) or _start_background(request.node, marker)
    request.node.stash[_BACKGROUND] = run
    try:
        run.finish(BACKGROUND_WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{' '.join(run.argv)} still ran {BACKGROUND_WAIT_S} s after the test began; killed.\n{run.log_tail()}"
        )
    return run


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
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)  # stable
