"""What a person sees while a job runs: a few lines on the console, everything else in a log file.

    from jobs import console
    log_file = console.setup("demo", verbose=args.verbose, log_dir=out / "logs")
    console.step("preparing train")                  # one line per stage
    with console.progress(n, "prepare train", unit="img") as bar:
        bar.update(64)                               # one live bar per long stage
    with console.training_progress(cfg.train.epochs) as callbacks:
        run_training(cfg, data, callbacks=callbacks)  # one bar over the epochs: loss, held-out exact %, time left

By default (`verbose=False`) the job's console shows only what the job prints through this module (and
its own `print`s): Ray's, Ray Data's, Ray Train/Tune/Serve's and MLflow's loggers, captured warnings and
the library progress bars go to the log file instead, and Ray workers keep their output in the Ray
session's log folder (`log_to_driver=False`, see `log_to_driver()`, read by jobs.runtime.ensure_ray).
`verbose=True` leaves every library's console output as it was and still writes the log file.

Live bars are drawn only when stdout is a terminal; otherwise (CI, `| tee`, a test capturing output)
a bar prints a plain line at each quarter, so a captured run stays a short, readable transcript.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Loggers that libraries give their own console handlers; in quiet mode they go to the log file only.
LIBRARY_LOGGERS = (
    *("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"),
    *("mlflow", "alembic", "huey", "sqlalchemy.engine", "py.warnings"),
)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Environment read by libraries (and inherited by Ray workers started after setup()).
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # Ray Data's per-operator tqdm bars, driver and workers
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars when loading a model
    "MLFLOW_CONFIGURE_LOGGING": "false",  # no stderr handler on "mlflow" at import: its records reach the file
    "TQDM_DISABLE": "1",  # any other library bar; our own bars pass disable=False explicitly
}


@dataclass
class _State:
    verbose: bool = True  # before setup(): a library caller keeps every library's usual output
    log_file: Path | None = None
    handler: logging.Handler | None = None


_state = _State()


def setup(job: str, *, verbose: bool = False, log_dir: str | Path | None = None) -> Path:
    """Route library output to `<log_dir>/<job>-<time>.log` (default ./logs); print and return its path."""
    folder = Path(log_dir or os.environ.get("VLJEPA_LOG_DIR") or "logs").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    _state.verbose, _state.log_file = verbose, path

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    if _state.handler is not None:  # setup() called again in one process (tests): one file at a time
        root.removeHandler(_state.handler)
        _state.handler.close()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    _state.handler = handler
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the file
    if not verbose:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        warnings.simplefilter("default")  # each warning once, in the file, instead of once per call site
        hush()
    print(f"log: {path}" + ("" if verbose else "  (library and worker output; --verbose shows it here)"))
    return path


def setup_once(job: str, *, verbose: bool = False, log_dir: str | Path | None = None) -> Path:
    """`setup()` unless this process already did it (a job's main() called by another job, e.g. the demo)."""
    return _state.log_file if _state.log_file is not None else setup(job, verbose=verbose, log_dir=log_dir)


def hush() -> None:
    """Send the library loggers to the log file only; call again after a library adds console handlers.

    Importing ray installs a stderr handler on "ray", importing ray.data one on "ray.data", mlflow one on
    "mlflow"; these keep their file handlers (Ray's session logs) and lose the console ones.
    """
    if _state.verbose:
        return
    import ray  # noqa: F401  (installs Ray's handlers first, so they can be removed)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True  # -> the root logger's file handler


def is_verbose() -> bool:
    return _state.verbose


def log_file() -> Path | None:
    return _state.log_file


def log_to_driver() -> bool:
    """Whether Ray should stream worker stdout/stderr to this process (ray.init's `log_to_driver`)."""
    return _state.verbose


def ray_logs() -> str | None:
    """The Ray session's log folder (worker, Train controller and Serve replica output), when Ray runs here."""
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        return None if node is None else os.path.join(node.get_session_dir_path(), "logs")
    except Exception:  # joined a remote cluster, or Ray internals moved: the path is a convenience only
        return None


def step(text: str) -> None:
    """One line per stage."""
    print(f"== {text}", flush=True)


def detail(label: str, value: Any) -> None:
    """An aligned `label: value` line under a stage (where things are, what was chosen)."""
    print(f"   {label + ':':16s} {value}", flush=True)


# ---------------------------------------------------------------------------
# Progress


def _terminal() -> bool:
    """stdout is a terminal with a width (a pty without a size, as under `script`, would draw nothing)."""
    try:
        return sys.stdout.isatty() and os.get_terminal_size(sys.stdout.fileno()).columns > 0
    except (OSError, ValueError):  # replaced stdout (pytest capture, a notebook): no fileno or no size
        return False


def _eta(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Progress:
    """A tqdm bar on a terminal; elsewhere a plain line whenever another `every` of the total is done
    (every update when `every` is 0), and a last line with the elapsed time on close."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", every: float = 0.25, enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.every, self.enabled = max(0, total), desc, unit, every, enabled
        self.n, self.postfix = 0, ""
        self.started = time.perf_counter()
        self._next_mark = every
        self._bar = None
        if enabled and _terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=sys.stdout, dynamic_ncols=True, disable=False)

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.n += n
        self.postfix = postfix or self.postfix
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)
            return
        fraction = self.n / self.total if self.total else 1.0
        if self.n < self.total and (self.every <= 0 or fraction + 1e-9 >= self._next_mark):
            if self.every > 0:
                self._next_mark = (math.floor(fraction / self.every + 1e-9) + 1) * self.every
            print(self._line(), flush=True)

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.started
        pct = 100.0 * self.n / self.total if self.total else 100.0
        parts = [f"   {self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%)"]
        if self.postfix:
            parts.append(self.postfix)
        if 0 < self.n < self.total:
            parts.append(f"~{_eta(elapsed / self.n * (self.total - self.n))} left")
        else:
            parts.append(f"{elapsed:.0f} s")
        return "  ".join(parts)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.n:
            print(self._line(), flush=True)
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, *, unit: str = "it", every: float = 0.25, enabled: bool = True) -> Progress:
    return Progress(total, desc, unit=unit, every=every, enabled=enabled)


def epoch_postfix(metrics: dict[str, Any]) -> str:
    """`loss 0.1234  held-out exact 97.2%` from one epoch's reported metrics."""
    parts = []
    if isinstance(metrics.get("train_loss"), int | float):
        parts.append(f"loss {metrics['train_loss']:.4f}")
    if isinstance(metrics.get("exact_match_pct"), int | float):
        parts.append(f"held-out exact {metrics['exact_match_pct']:.1f}%")
    return "  ".join(parts)


@contextlib.contextmanager
def training_progress(epochs: int, desc: str = "training") -> Iterator[list[Any]]:
    """Yields Ray Train callbacks for `RunConfig(callbacks=...)`; draws one bar over the epochs here.

    Ray Train calls `UserCallback.after_report` on its controller actor, not in this process, so the
    callback forwards rank 0's metrics to a CPU-less mailbox actor that a thread of this process drains.
    Each epoch line (or bar step) shows the training loss, held-out exact-match % and time left.
    """
    import ray

    mailbox = _mailbox_class().remote()
    bar = Progress(epochs, desc, unit="epochs", every=0)  # every epoch is news
    stop = threading.Event()

    def pump() -> None:
        finished_at = None
        while True:
            if finished_at is not None:
                time.sleep(0.1)
            elif stop.wait(0.5):
                finished_at = time.monotonic()
            try:
                reports = ray.get(mailbox.drain.remote(), timeout=30)
            except Exception:  # Ray shutting down: the bar is a convenience, never a failure
                return
            for metrics in reports:
                epoch = int(metrics.get("epoch", bar.n + 1))
                if epoch > bar.n:  # a restarted worker group may report an epoch again
                    if bar.n == 0 and epoch > 1:  # resumed run: start the clock at the restored epoch
                        bar.n, bar.started = epoch - 1, time.perf_counter()
                    bar.update(epoch - bar.n, epoch_postfix(metrics))
            # After fit() returns, the last epoch's report may still be on its way from the controller.
            if finished_at is not None and (bar.n >= epochs or time.monotonic() - finished_at > 5):
                return

    thread = threading.Thread(target=pump, name="training-progress", daemon=True)
    thread.start()
    try:
        yield [_epoch_callback(mailbox)]
    finally:
        stop.set()
        thread.join(timeout=35)
        bar.close()
        ray.kill(mailbox)


def _mailbox_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class EpochMailbox:
        """Rank 0's metrics per report, kept until the driver drains them."""

        def __init__(self) -> None:
            self.items: list[dict[str, Any]] = []

        def put(self, item: dict[str, Any]) -> None:
            self.items.append(item)

        def drain(self) -> list[dict[str, Any]]:
            items, self.items = self.items, []
            return items

    return EpochMailbox


def _epoch_callback(mailbox: Any) -> Any:
    from ray.train import UserCallback  # imported late: jobs.train sets RAY_TRAIN_V2_ENABLED before ray.train

    class EpochReporter(UserCallback):
        """Runs on the Train controller: forwards rank 0's numeric metrics after every report."""

        def __init__(self, mailbox: Any) -> None:
            self.mailbox = mailbox

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                numbers = {k: v for k, v in metrics[0].items() if isinstance(v, int | float)}
                self.mailbox.put.remote(numbers)  # fire and forget: training never waits on the console

    return EpochReporter(mailbox)
