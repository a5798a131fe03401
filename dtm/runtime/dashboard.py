"""The ``/dtm`` page of the Dask dashboard: the cluster's correlations/s, a bar per worker.

:func:`install` installs the counters of :mod:`dtm.runtime.throughput` and, where bokeh is
importable (the ``viz`` extra; Dask's own dashboard needs it too), adds to the scheduler's
dashboard:

``/dtm``
    The cluster's correlations/s over the last ten minutes, a bar per worker, and how many
    workers were lost and came back, refreshed every second.
``/dtm/correlations.json``
    The same numbers as JSON (per worker and summed), for scripts and monitoring.
``/workers``
    Dask's Workers page lists the counters' worker metrics in its second table, one row
    per worker (columns ``dtm_correlations_per_second``, ``dtm_correlations_total``).
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

import distributed
from distributed import Scheduler
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.http.utils import RequestHandler

from dtm.runtime.throughput import RATE_WINDOW_S, cluster_rates, install_counters

if TYPE_CHECKING:
    from bokeh.document import Document

#: Name of the scheduler plugin that adds the page.
PAGE_PLUGIN_NAME = "dtm-dashboard-page"
#: The page refreshes every second and keeps ten minutes of history.
PAGE_UPDATE_MS = 1000
PAGE_HISTORY = 600


def bokeh_available() -> bool:
    """Whether bokeh can be imported here (the ``viz`` extra is installed)."""
    try:
        import bokeh  # noqa: F401, PLC0415 (the check: imported only where it is wanted)
    except ImportError:
        return False
    return True


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

    async def start(self, scheduler: Scheduler) -> None:
        application = getattr(scheduler, "http_application", None)
        if application is None or not bokeh_available():
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


def install(client: distributed.Client, window_s: float = RATE_WINDOW_S) -> bool:
    """Count correlations on every worker and add the ``/dtm`` dashboard page (once per run).

    The page is added only where bokeh is importable, and needs dtm importable on the
    scheduler (it is where ``dtm`` is installed, e.g. the deploy/ images); where it is not,
    only the counters are installed, with a warning. Returns whether the page was added.
    """
    install_counters(client, window_s)
    if not bokeh_available():
        return False
    try:
        client.register_plugin(DashboardPage(), name=PAGE_PLUGIN_NAME)
    except Exception as error:  # noqa: BLE001 (any failure on the scheduler: page is optional)
        warnings.warn(f"dtm dashboard page not installed on the scheduler: {error}", stacklevel=2)
        return False
    return True
