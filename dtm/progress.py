"""A text progress bar for a search: tasks done, correlations/s and ETA.

Progress is read from the scheduler's cumulative count of ``correlate`` tasks that reached
memory, so it works the same for an embedded cluster and a remote one.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO


def _correlate_done(dask_scheduler: Any) -> int:
    prefix = dask_scheduler.task_prefixes.get("correlate")
    return 0 if prefix is None else int(prefix.state_counts.get("memory", 0))


def format_duration(seconds: float) -> str:
    """``1h02m03s`` style duration."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Poll the scheduler in a thread and print one progress line.

    Parameters
    ----------
    client : distributed.Client
        Client of the cluster that runs the search.
    n_tasks : int
        Correlate tasks of this run.
    correlations_per_task : float
        Average correlations per task (for the rate).
    stream : file, optional
        Where to print (default: standard output). A terminal gets one line redrawn every
        ``interval`` seconds; a log gets a line every ``log_every`` seconds while tasks
        remain, and the final line once.
    """

    def __init__(
        self,
        client: Any,
        n_tasks: int,
        correlations_per_task: float,
        *,
        stream: TextIO | None = None,
        interval: float = 1.0,
        log_every: float = 10.0,
    ) -> None:
        self.client = client
        self.n_tasks = n_tasks
        self.correlations_per_task = correlations_per_task
        self.stream = sys.stdout if stream is None else stream
        self.interval = interval
        self.log_every = log_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._baseline = 0
        self._start = time.perf_counter()
        self.done = 0
        self._last_print = 0.0

    def __enter__(self) -> Progress:
        self._baseline = self.client.run_on_scheduler(_correlate_done)
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self.done = self.n_tasks
            self._print(final=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                counted = self.client.run_on_scheduler(_correlate_done) - self._baseline
            except Exception:  # the scheduler may be gone while we shut down
                return
            self.done = min(max(counted, 0), self.n_tasks)
            self._print()

    def _print(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self._start
        rate = self.done * self.correlations_per_task / elapsed if elapsed > 0 else 0.0
        left = self.n_tasks - self.done
        eta = left * elapsed / self.done if self.done else float("nan")
        width = 30
        filled = int(width * self.done / max(self.n_tasks, 1))
        bar = "#" * filled + "-" * (width - filled)
        eta_text = format_duration(eta) if eta == eta else "?"
        line = (
            f"[{bar}] {self.done}/{self.n_tasks} tasks  {rate:,.0f} correlations/s  "
            f"elapsed {format_duration(elapsed)}  ETA {eta_text}"
        )
        if self.stream.isatty():
            self.stream.write("\r" + line + ("\n" if final else ""))
        elif final or (self.done < self.n_tasks and elapsed - self._last_print >= self.log_every):
            self._last_print = elapsed
            self.stream.write(line + "\n")
        self.stream.flush()
