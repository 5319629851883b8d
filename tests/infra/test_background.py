"""Background tests (tests/background_commands.py) in small pytest sessions of their own: the command runs under
SCHED_IDLE while the other tests run, its test runs last and sees its exit status and output, a failing command
fails its test with the command's log, a deselected background test starts nothing, and the output folder is
removed."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from background_commands import (
    background, pytest_collection_finish, pytest_sessionfinish, run_background_tests_last,
)

def pytest_collection_modifyitems(config, items):
    run_background_tests_last(items)
"""

# A command (`python -m bg_probe OUT STATUS`): writes to OUT whether it runs under SCHED_IDLE, records that it
# ran, exits with STATUS.
PROBE = """
import os, sys
from pathlib import Path
Path(sys.argv[1]).write_text(str(os.sched_getscheduler(0) == os.SCHED_IDLE))
(Path(__file__).parent / "ran").open("a").write(sys.argv[1] + "\\n")
print("probe says goodbye with", sys.argv[2])
sys.exit(int(sys.argv[2]))
"""

TESTS_FILE = """
from pathlib import Path
import pytest

ORDER = []

@pytest.mark.background("bg_probe", "{out}/idle.txt", "0")
def test_good(background):
    assert ORDER == ["plain"]  # ran last although defined first
    assert background.proc.returncode == 0
    assert (background.out / "idle.txt").read_text() == "True"
    assert "goodbye with 0" in background.log.read_text()
    (Path(__file__).parent / "out_folder").write_text(str(background.out))

def test_plain():
    ORDER.append("plain")

@pytest.mark.background("bg_probe", "{out}/idle.txt", "3")
def test_bad(background):
    assert background.proc.returncode == 0, background.log_tail()
"""


@pytest.fixture
def session(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(bg_probe=PROBE, test_bg=TESTS_FILE)
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))  # the command runs from the repo root
    return pytester


def test_background_commands_run_beside_the_session_and_report(session: pytest.Pytester):
    run = session.inline_run("-p", "no:cacheprovider")
    run.assertoutcome(passed=2, failed=1)
    calls = [r for r in run.getreports("pytest_runtest_logreport") if r.when == "call"]
    assert [r.nodeid.split("::")[1] for r in calls] == ["test_plain", "test_good", "test_bad"]
    (bad,) = [r for r in calls if r.failed]
    assert "assert 3 == 0" in bad.longreprtext and "probe says goodbye with 3" in bad.longreprtext  # its log
    assert len((session.path / "ran").read_text().split()) == 2
    assert not Path((session.path / "out_folder").read_text()).exists()  # removed at the end of the session


def test_a_deselected_background_test_starts_nothing(session: pytest.Pytester):
    session.inline_run("-p", "no:cacheprovider", "-k", "plain").assertoutcome(passed=1)
    assert not (session.path / "ran").exists()
