"""Correlations per second of each worker, shown on the Dask dashboard.

:func:`install` registers a worker plugin (on every worker, present and future) that adds
two custom worker metrics, sent to the scheduler with each heartbeat:

``dtm_correlations_per_second``
    Correlations computed by the worker over the last :data:`RATE_WINDOW_S` seconds,
    per second (one correlation = one orientation × defocus plane over the whole image).
``dtm_correlations_total``
    Correlations computed since the plugin was installed.

Where to see them, on the scheduler's dashboard:

``/dtm``
    A page added by :func:`install`: the cluster's correlations/s over the last ten minutes,
    a bar per worker, and how many workers were lost and came back, refreshed every second.
``/dtm/correlations.json``
    The same numbers as JSON (per worker and summed), for scripts and monitoring.
``/workers``
    Dask's Workers page lists custom numeric worker metrics in its second table, one row
    per worker (columns ``dtm_correlations_per_second``, ``dtm_correlations_total``).

The correlate task calls :func:`count_correlations` after each chunk; outside a worker, or
on a worker without the plugin, it does nothing.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from typing import TYPE_CHECKING, Any

import distributed
from distributed import Scheduler
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from distributed.http.utils import RequestHandler

if TYPE_CHECKING:
    from bokeh.document import Document

#: Names of the worker plugin (counter) and of the scheduler plugin (dashboard page).
PLUGIN_NAME = "dtm-correlation-counter"
PAGE_PLUGIN_NAME = "dtm-dashboard-page"
#: The page refreshes every second and keeps ten minutes of history.
PAGE_UPDATE_MS = 1000
PAGE_HISTORY = 600
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


def cluster_rates(scheduler: Scheduler) -> dict[str, Any]:
    """Correlations/s and totals per worker (last heartbeat) and for the whole cluster, and
    how many workers left the cluster and came back (by name) since the page was added."""
    workers = {
        address: {
            "name": str(ws.name),
            "correlations_per_second": float(ws.metrics.get(RATE_METRIC, 0.0)),
            "correlations_total": int(ws.metrics.get(TOTAL_METRIC, 0)),
        }
        for address, ws in scheduler.workers.items()
    }
    page = scheduler.plugins.get(PAGE_PLUGIN_NAME)
    return {
        "workers": workers,
        "correlations_per_second": sum(w["correlations_per_second"] for w in workers.values()),
        "correlations_total": sum(w["correlations_total"] for w in workers.values()),
        "workers_lost": int(getattr(page, "lost", 0)),
        "workers_returned": int(getattr(page, "returned", 0)),
    }


class _RatesJSON(RequestHandler):
    def get(self) -> None:
        self.write(cluster_rates(self.server))


def _page(scheduler: Scheduler, extra: dict[str, Any], doc: Document) -> None:
    """The bokeh document of ``/dtm``: cluster rate over time and rate per worker."""
    # bokeh is imported here, on the scheduler, so that workers counting correlations never
    # pay for it.
    from bokeh.layouts import column  # noqa: PLC0415
    from bokeh.models import ColumnDataSource, FactorRange  # noqa: PLC0415
    from bokeh.models.widgets import Div  # noqa: PLC0415
    from bokeh.plotting import figure  # noqa: PLC0415

    history = ColumnDataSource({"time": [], "rate": []})
    per_worker = ColumnDataSource({"worker": [], "rate": []})
    summary = Div(text="waiting for the first heartbeat…")
    timeline = figure(
        title="correlations/s, whole cluster",
        x_axis_type="datetime",
        height=260,
        sizing_mode="stretch_width",
        tools="",
    )
    timeline.line("time", "rate", source=history, line_width=2)
    bars = figure(
        title="correlations/s per worker",
        y_range=FactorRange(),
        height=320,
        sizing_mode="stretch_width",
        tools="",
        x_axis_label="correlations/s",
    )
    bars.hbar(y="worker", right="rate", height=0.8, source=per_worker)

    def update() -> None:
        rates = cluster_rates(scheduler)
        names = [f"{w['name']} ({a})" for a, w in rates["workers"].items()]
        bars.y_range.factors = names  # type: ignore[attr-defined]
        per_worker.data = {
            "worker": names,
            "rate": [w["correlations_per_second"] for w in rates["workers"].values()],
        }
        now_ms = time.time() * 1000.0
        history.stream(
            {"time": [now_ms], "rate": [rates["correlations_per_second"]]}, rollover=PAGE_HISTORY
        )
        summary.text = (
            f"<b>{rates['correlations_per_second']:,.0f} correlations/s</b> on "
            f"{len(names)} workers ({rates['workers_lost']} lost, "
            f"{rates['workers_returned']} returned); "
            f"{rates['correlations_total']:,} correlations counted"
        )

    update()
    doc.add_periodic_callback(update, PAGE_UPDATE_MS)
    doc.title = "dtm: correlations/s"
    doc.add_root(column(summary, timeline, bars, sizing_mode="stretch_width"))


class DashboardPage(SchedulerPlugin):
    """Adds ``/dtm`` (bokeh page) and ``/dtm/correlations.json`` to the scheduler's dashboard."""

    name = PAGE_PLUGIN_NAME
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
        application = getattr(scheduler, "http_application", None)
        if application is None:
            return
        application.add_handlers(
            r".*", [(r"/dtm/correlations.json", _RatesJSON, {"dask_server": scheduler})]
        )
        from distributed.dashboard.core import BokehApplication  # noqa: PLC0415 (needs bokeh)
        from tornado.ioloop import IOLoop  # noqa: PLC0415

        page = BokehApplication({"/dtm": _page}, scheduler)
        application.add_application(page)
        page.initialize(IOLoop.current())
        page.start()


def install(client: distributed.Client, window_s: float = RATE_WINDOW_S) -> None:
    """Count correlations on every worker and add the ``/dtm`` dashboard page (once per run).

    The page needs dtm importable on the scheduler (it is where ``dtm`` is installed, e.g.
    the deploy/ images); where it is not, only the worker metrics are installed, with a
    warning.
    """
    client.register_plugin(CorrelationCounter(window_s), name=PLUGIN_NAME)
    try:
        client.register_plugin(DashboardPage(), name=PAGE_PLUGIN_NAME)
    except Exception as error:  # noqa: BLE001 (any failure on the scheduler: page is optional)
        warnings.warn(f"dtm dashboard page not installed on the scheduler: {error}", stacklevel=2)


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
