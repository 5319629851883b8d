"""Background tests: `@pytest.mark.background(module, *args)` runs `python -m module *args` (from the repo root) in a
child process started when collection ends, at the lowest CPU priority (SCHED_IDLE), while the rest of the session
runs; the test itself runs last (tests/conftest.py orders it) and gets the finished command from the `background`
fixture ("{out}" in an argument is the command's own output folder, removed at the end of the session).

Why: the session's Ray tests keep 0.4-0.8 of the two cores idle on average (process start-up, polls, HTTP round
trips); a single-threaded CPU-bound command under Linux's SCHED_IDLE policy takes that idle time and yields to
everything else: any normal task that wakes preempts it at once, where a nice-19 task may first finish its slice
(with nice 19 one fresh-clone run's Ray tests during the command ran 25-45% slower than another's). The
Run-0 quality test is one: ~200 s of training on one thread that used to run alone.
"""

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

ROOT = Path(__file__).resolve().parents[1]
BACKGROUND_NICE = 19  # where SCHED_IDLE is missing (not Linux)
BACKGROUND_WAIT_S = 540  # the longest a background test waits for its command (under pytest-timeout's 600 s)


@dataclass
class BackgroundRun:
    """A background test's command: its process, output folder and log (stdout and stderr together)."""

    argv: list[str]
    proc: subprocess.Popen
    out: Path
    log: Path

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
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(proc.pid, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.setpriority(os.PRIO_PROCESS, proc.pid, BACKGROUND_NICE)
    return BackgroundRun(argv, proc, out, log)


def run_background_tests_last(items: list[pytest.Item]) -> None:
    """Move the background tests to the end, keeping every other test's order (call from
    pytest_collection_modifyitems): their commands then have the whole session to finish."""
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)  # a stable sort


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
    """The test's finished background command (started by pytest_collection_finish)."""
    run = request.node.stash.get(_BACKGROUND, None)
    assert run is not None, "the `background` fixture belongs to a test marked @pytest.mark.background(...)"
    try:
        run.proc.wait(timeout=BACKGROUND_WAIT_S)
    except subprocess.TimeoutExpired:
        run.proc.kill()  # pytest_sessionfinish reaps it and removes its folder
        pytest.fail(
            f"{' '.join(run.argv)} still ran {BACKGROUND_WAIT_S} s after the test began; killed.\n{run.log_tail()}"
        )
    return run
