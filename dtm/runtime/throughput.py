"""Correlations per second of each worker: the one count of a search's throughput.

The correlate task calls :func:`count_correlations` after each chunk; the worker plugin
that :func:`install_counters` registers (on every worker, present and future) counts them
and publishes two custom worker metrics, sent to the scheduler with each heartbeat:

``dtm_correlations_per_second``
    Correlations computed by the worker over the last :data:`RATE_WINDOW_S` seconds,
    per second (one correlation = one orientation × defocus plane over the whole image).
``dtm_correlations_total``
    Correlations computed since the plugin was installed.

:func:`cluster_rates` sums them on the scheduler, with how many workers left and came back:
what the progress line (:mod:`dtm.runtime.progress`) prints as correlations/s and what the
dashboard page (:mod:`dtm.runtime.dashboard`) draws. Dask's Workers page lists the two
metrics in its second table. Outside a worker, or on a worker without the plugin,
:func:`count_correlations` does nothing. Nothing here imports bokeh: workers never pay for
the dashboard.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from typing import Any

import distributed
from distributed import Scheduler
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

#: Names of the worker plugin (counter) and of the scheduler plugin (workers lost, returned).
PLUGIN_NAME = "dtm-correlation-counter"
CHURN_PLUGIN_NAME = "dtm-worker-churn"
#: Worker metrics added by the plugin.
RATE_METRIC = "dtm_correlations_per_second"
TOTAL_METRIC = "dtm_correlations_total"
#: The rate averages the correlations finished in this many seconds: a task lasts a few
#: seconds, so a shorter window would jump between 0 and a task's burst.
RATE_WINDOW_S = 20.0


class CorrelationCounter(WorkerPlugin):
    """Counts correlations on one worker and publishes them as worker metrics."""

    name = PLUGIN_NAME
    #: A second ``install`` (another run on the same cluster) keeps the running counters.
    idempotent = True

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        # Only picklable state here: the plugin travels to the workers.
        self.window_s = float(window_s)

    def setup(self, worker: distributed.Worker) -> None:
        self._lock = threading.Lock()
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0
        self._since = time.monotonic()
        worker.metrics[RATE_METRIC] = lambda _worker: self.rate()
        worker.metrics[TOTAL_METRIC] = lambda _worker: self.total()

    def teardown(self, worker: distributed.Worker) -> None:
        worker.metrics.pop(RATE_METRIC, None)
        worker.metrics.pop(TOTAL_METRIC, None)

    def add(self, n_correlations: int, now: float | None = None) -> None:
        """Record ``n_correlations`` finished at ``now`` (monotonic seconds)."""
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, int(n_correlations)))
            self._total += int(n_correlations)

    def total(self) -> int:
        """Correlations since the plugin was set up."""
        with self._lock:
            return self._total

    def rate(self, now: float | None = None) -> float:
        """Correlations per second over the last ``window_s`` seconds (or since set-up)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            recent = sum(n for _, n in self._events)
        span = min(self.window_s, now - self._since)
        return recent / span if span > 0 else 0.0


class WorkerChurn(SchedulerPlugin):
    """Counts the workers that left the cluster and those that came back, on the scheduler."""

    name = CHURN_PLUGIN_NAME
    idempotent = True

    def __init__(self) -> None:
        self.names: set[str] = set()
        #: Workers removed from the cluster (lost, killed or retired), and workers that came
        #: back under a name seen before (a nanny's restart, a resubmitted batch job).
        self.lost = 0
        self.returned = 0

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        state = scheduler.workers.get(worker)
        name = str(state.name if state is not None else worker)
        self.returned += name in self.names
        self.names.add(name)

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self.lost += 1

    async def start(self, scheduler: Scheduler) -> None:
        self.names |= {str(state.name) for state in scheduler.workers.values()}


def cluster_rates(scheduler: Scheduler) -> dict[str, Any]:
    """Correlations/s and totals per worker (last heartbeat) and for the whole cluster, and
    how many workers left the cluster and came back (by name) since the counters were installed."""
    workers = {
        address: {
            "name": str(ws.name),
            "correlations_per_second": float(ws.metrics.get(RATE_METRIC, 0.0)),
            "correlations_total": int(ws.metrics.get(TOTAL_METRIC, 0)),
        }
        for address, ws in scheduler.workers.items()
    }
    churn = scheduler.plugins.get(CHURN_PLUGIN_NAME)
    return {
        "workers": workers,
        "correlations_per_second": sum(w["correlations_per_second"] for w in workers.values()),
        "correlations_total": sum(w["correlations_total"] for w in workers.values()),
        "workers_lost": int(getattr(churn, "lost", 0)),
        "workers_returned": int(getattr(churn, "returned", 0)),
    }


def install_counters(client: distributed.Client, window_s: float = RATE_WINDOW_S) -> None:
    """Count correlations on every worker, and workers lost and returned on the scheduler
    (idempotent: a second run on the same cluster keeps the running counts).

    The scheduler's plugin needs dtm importable on the scheduler (it is where ``dtm`` is
    installed, e.g. the deploy/ images); where it is not, only the worker metrics are
    installed, with a warning.
    """
    client.register_plugin(CorrelationCounter(window_s), name=PLUGIN_NAME)
    try:
        client.register_plugin(WorkerChurn(), name=CHURN_PLUGIN_NAME)
    except Exception as error:  # noqa: BLE001 (any failure on the scheduler: counts only)
        warnings.warn(f"dtm worker counts not installed on the scheduler: {error}", stacklevel=2)


def count_correlations(n_correlations: int) -> None:
    """Count correlations done by the current task; a no-op outside a counting worker."""
    try:
        worker = distributed.get_worker()
    except ValueError:
        return
    plugin: Any = worker.plugins.get(PLUGIN_NAME)
    if isinstance(plugin, CorrelationCounter):
        plugin.add(n_correlations)


def worker_rates(client: distributed.Client) -> dict[str, Any]:
    """:func:`cluster_rates` of ``client``'s scheduler."""

    def collect(dask_scheduler: Scheduler) -> dict[str, Any]:
        return cluster_rates(dask_scheduler)

    return dict(client.run_on_scheduler(collect))
