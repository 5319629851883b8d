"""jobs.console without Ray running: library loggers and warnings go to the log file, bars print a few lines.

(The demo's whole default transcript is bounded in tests/jobs/test_demo.py.)
"""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings

import pytest

from jobs import console


@pytest.fixture
def restore_logging():
    """console.setup changes process-wide logging, warnings and environment: put them back afterwards."""
    import ray.data  # noqa: F401  (Ray and Ray Data install their console handlers on import: snapshot after that)

    names = ("", *console.LIBRARY_LOGGERS)
    saved = {
        n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate, logging.getLogger(n).level)
        for n in names
    }
    state, env = copy.copy(console._state), dict(os.environ)
    filters = list(warnings.filters)
    logging.captureWarnings(False)  # an earlier setup() in this process (the demo test) must not hide this one's
    yield
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers, logger.propagate, logger.level = handlers, propagate, level
    console._state.verbose, console._state.log_file, console._state.handler = (
        state.verbose,
        state.log_file,
        state.handler,
    )
    os.environ.clear()
    os.environ.update(env)
    warnings.filters[:] = filters
    logging.captureWarnings(False)


def test_quiet_setup_sends_library_output_to_the_log_file(restore_logging, tmp_path, capfd) -> None:
    library_console = io.StringIO()  # stands for the stderr handler a library installs on its logger
    logging.getLogger("ray.train").addHandler(logging.StreamHandler(library_console))
    path = console.setup("unit", verbose=False, log_dir=tmp_path)
    logging.getLogger("ray.data").info("Starting execution of Dataset unit-test")
    logging.getLogger("ray.train").warning("PlacementGroupCleaner: Failed to query Ray Train Controller actor state")
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    warnings.warn("a deprecated thing", FutureWarning, stacklevel=1)
    console.step("stage one")

    out = capfd.readouterr()
    assert out.err == "" and library_console.getvalue() == ""
    assert out.out.splitlines() == [
        f"log: {path}  (library and worker output; --verbose shows it here)",
        "== stage one",
    ]
    assert path.parent == tmp_path and path.name.startswith("unit-")
    logged = path.read_text()
    for text in ("Starting execution of Dataset unit-test", "PlacementGroupCleaner", "initial MLflow", "deprecated"):
        assert text in logged, text
    assert console.log_to_driver() is False  # ensure_ray keeps worker output in Ray's session logs
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"


def test_verbose_setup_keeps_library_output_on_the_console(restore_logging, tmp_path) -> None:
    library_console = io.StringIO()
    logging.getLogger("ray.train").addHandler(logging.StreamHandler(library_console))
    path = console.setup("unit", verbose=True, log_dir=tmp_path)
    logging.getLogger("ray.train").warning("controller says hello")
    assert "controller says hello" in library_console.getvalue()
    logging.getLogger("jobs.unit").warning("tracking says hello")  # our own loggers reach the file
    assert "tracking says hello" in path.read_text()  # the file gets everything either way
    assert console.log_to_driver() is True


def test_setup_once_keeps_the_first_log_file(restore_logging, tmp_path) -> None:
    first = console.setup("demo", log_dir=tmp_path / "a")
    assert console.setup_once("prepare", log_dir=tmp_path / "b") == first  # prepare.main called by the demo
    assert not (tmp_path / "b").exists()


def test_a_bar_without_a_terminal_prints_a_line_per_quarter(capsys) -> None:
    with console.progress(100, "prepare train", unit="img") as bar:
        for _ in range(10):
            bar.update(10)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == [
        "30/100 img",
        "50/100 img",
        "80/100 img",
        "100/100 img",
    ]
    assert "left" in lines[0] and "left" not in lines[-1]


def test_the_epoch_bar_prints_loss_and_held_out_exact_each_epoch(capsys) -> None:
    bar = console.progress(3, "training", unit="epochs", every=0)
    for epoch, (loss, exact) in enumerate([(2.5, 10.0), (1.25, 55.5), (0.5, 100.0)], start=1):
        bar.update(1, console.epoch_postfix({"epoch": epoch, "train_loss": loss, "exact_match_pct": exact}))
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert "1/3 epochs" in lines[0] and "loss 2.5000" in lines[0] and "held-out exact 10.0%" in lines[0]
    assert "left" in lines[1]
    assert "3/3 epochs" in lines[2] and "held-out exact 100.0%" in lines[2]
