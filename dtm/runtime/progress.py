"""A text progress bar for a search: tasks done, correlations/s and ETA.

The tasks done are the scheduler's cumulative count of ``correlate`` tasks that reached
memory, so the bar works the same for an embedded cluster and a remote one. The
correlations/s are the workers' counters of :mod:`dtm.runtime.throughput`, summed on the
scheduler: the number the dashboard shows.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from dtm.runtime.throughput import cluster_rates


def _correlate_done(dask_scheduler: Any) -> int:
    prefix = dask_scheduler.task_prefixes.get("correlate")
    return 0 if prefix is None else int(prefix.state_counts.get("memory", 0))


def _snapshot(dask_scheduler: Any) -> tuple[int, int, int, float | None]:
    """Correlate tasks done so far, workers connected, workers paused for memory, and the
    cluster's correlations/s (None while no worker counts them)."""
    workers = list(dask_scheduler.workers.values())
    paused = sum(getattr(ws.status, "name", str(ws.status)) == "paused" for ws in workers)
    rates = cluster_rates(dask_scheduler)
    counted = rates["correlations_total"] > 0 or rates["correlations_per_second"] > 0
    rate = float(rates["correlations_per_second"]) if counted else None
    return _correlate_done(dask_scheduler), len(workers), paused, rate


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
        Average correlations per task: the rate while the workers count none (no counter
        installed on them) is estimated from the tasks done.
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
        stall_timeout: float | None = None,
        worker_timeout: float | None = None,
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
        self.stall_timeout = stall_timeout
        self.worker_timeout = worker_timeout
        self.workers = -1  # unknown yet
        self.most_workers = 0
        self.lost = 0
        self.returned = 0
        self.paused = 0
        self._last_progress = time.monotonic()
        self._no_workers_since: float | None = None
        self._problem: str | None = None
        #: The cluster's correlations/s at the last poll (None: the workers count none).
        self.rate: float | None = None

    def __enter__(self) -> Progress:
        self._baseline, workers, _, _ = self.client.run_on_scheduler(_snapshot)
        self._workers_changed(workers)  # the workers at the start: later losses count
        self._start = time.perf_counter()
        self._last_progress = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self.done = self.n_tasks
            self._print(final=True)

    def touch(self) -> None:
        """Something finished (a micrograph): the run is making progress."""
        self._last_progress = time.monotonic()

    def problem(self) -> str | None:
        """Why the run should stop (no progress, no workers), or None."""
        return self._problem

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                counted, workers, paused, self.rate = self.client.run_on_scheduler(_snapshot)
            except Exception:  # the scheduler may be gone while we shut down
                return
            counted -= self._baseline
            now = time.monotonic()
            done = min(max(counted, 0), self.n_tasks)
            if done != self.done:
                self._last_progress = now
            self.done = done
            event = self._workers_changed(workers)
            self.paused = paused
            self._check(now)
            self._print(event=event)

    def _workers_changed(self, workers: int) -> bool:
        """Count lost and returning workers; True when the number changed."""
        before, self.workers = self.workers, workers
        if before < 0:
            self.most_workers = workers
            return False
        if workers < before:
            self.lost += before - workers
        elif workers > before and self.lost > self.returned:
            self.returned += min(workers - before, self.lost - self.returned)
        self.most_workers = max(self.most_workers, workers)
        return workers != before

    def _check(self, now: float) -> None:
        """Decide whether the run is stuck: no worker left, or no task finishing."""
        if self.workers == 0:
            self._no_workers_since = self._no_workers_since or now
            lost_for = now - self._no_workers_since
            if self.worker_timeout is not None and lost_for >= self.worker_timeout:
                lost = f"all {self.lost} lost" if self.lost else "none connected"
                self._problem = (
                    f"no dask worker left for {format_duration(lost_for)} ({lost}); start "
                    "workers again, or check why they died"
                )
            return  # waiting for workers is not a stall
        self._no_workers_since = None
        stalled = now - self._last_progress
        if self.stall_timeout is None or stalled < self.stall_timeout:
            return
        if self.paused:
            self._problem = (
                f"no task finished for {format_duration(stalled)}: {self.paused} of "
                f"{self.workers} worker(s) paused because they hit their memory limit; give "
                "the workers more memory (cluster.memory_limit), or fewer threads each"
            )
        else:
            self._problem = (
                f"no task finished for {format_duration(stalled)} on {self.workers} "
                "worker(s) (cluster.stall_timeout); check the workers' logs"
            )

    def _status(self) -> str:
        """Workers lost, returned, paused; how long without progress (empty: all well)."""
        parts = []
        if self.lost:
            parts.append(f"{self.lost} lost")
        if self.returned:
            parts.append(f"{self.returned} returned")
        if self.paused:
            parts.append(f"{self.paused} paused for memory")
        text = ""
        if self.workers >= 0 and (parts or self.workers == 0):
            text = f"  workers {self.workers}" + (f" ({', '.join(parts)})" if parts else "")
        stalled = time.monotonic() - self._last_progress
        if self.done < self.n_tasks and stalled >= 30:
            text += f"  no progress for {format_duration(stalled)}"
        return text

    def _print(self, final: bool = False, event: bool = False) -> None:
        elapsed = time.perf_counter() - self._start
        rate = self.rate
        if rate is None:
            rate = self.done * self.correlations_per_task / elapsed if elapsed > 0 else 0.0
        left = self.n_tasks - self.done
        eta = left * elapsed / self.done if self.done else float("nan")
        width = 30
        filled = int(width * self.done / max(self.n_tasks, 1))
        bar = "#" * filled + "-" * (width - filled)
        eta_text = format_duration(eta) if eta == eta else "?"
        line = (
            f"[{bar}] {self.done}/{self.n_tasks} tasks  {rate:,.0f} correlations/s  "
            f"elapsed {format_duration(elapsed)}  ETA {eta_text}{self._status()}"
        )
        if self.stream.isatty():
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        elif (
            final
            or event
            or (self.done < self.n_tasks and elapsed - self._last_print >= self.log_every)
        ):
            self._last_print = elapsed
            self.stream.write(line + "\n")
        self.stream.flush()
