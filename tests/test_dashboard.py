"""Correlations/s per worker on the Dask dashboard."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import distributed
import pytest
from distributed.dashboard.components.scheduler import WorkerTable
from headless_chromium import Page, chromium_path, run_page

from dtm.runtime.dashboard import install
from dtm.runtime.throughput import (
    RATE_METRIC,
    RATE_WINDOW_S,
    TOTAL_METRIC,
    CorrelationCounter,
    count_correlations,
    worker_rates,
)

#: Correlations counted by each task of the test run, and the number of tasks.
PER_TASK = 1234
N_TASKS = 6


def counting_task(n: int) -> int:
    count_correlations(n)
    return n


def test_rate_is_correlations_over_the_recent_window() -> None:
    counter = CorrelationCounter(window_s=10.0)
    worker = SimpleNamespace(metrics={})  # the one attribute of a Worker that setup uses
    counter.setup(worker)  # type: ignore[arg-type]
    start = counter._since  # noqa: SLF001 (the clock origin of the counter)
    counter.add(300, now=start + 1.0)
    counter.add(500, now=start + 3.0)
    # 4 s after set-up: everything counted so far over 4 s.
    assert counter.rate(now=start + 4.0) == pytest.approx(800 / 4.0)
    # 12 s after: the window is full (10 s) and the first batch has left it.
    assert counter.rate(now=start + 12.0) == pytest.approx(500 / 10.0)
    assert counter.rate(now=start + 30.0) == 0.0
    assert counter.total() == 800
    assert worker.metrics[TOTAL_METRIC](worker) == 800
    assert worker.metrics[RATE_METRIC](worker) >= 0.0
    counter.teardown(worker)  # type: ignore[arg-type]
    assert worker.metrics == {}


def test_counting_outside_a_worker_does_nothing() -> None:
    count_correlations(10)  # no worker, no error


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[distributed.Client, str]]:
    """Two in-process workers that ran counting tasks; the dashboard's base URL."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as local,
        distributed.Client(local) as client,
    ):
        install(client)
        install(client)  # idempotent: a second run on the same cluster keeps counting
        client.gather(client.map(counting_task, [PER_TASK] * N_TASKS, pure=False))
        port = client.scheduler_info()["services"]["dashboard"]
        deadline = time.monotonic() + 20
        # Metrics reach the scheduler with the workers' heartbeats.
        while worker_rates(client)["correlations_total"] < PER_TASK * N_TASKS:
            assert time.monotonic() < deadline, "worker metrics never reached the scheduler"
            time.sleep(0.2)
        yield client, f"http://127.0.0.1:{port}"


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url) as response:
        return response.status, response.read()


def test_counts_reach_the_dashboard_json(cluster: tuple[distributed.Client, str]) -> None:
    client, base = cluster
    status, body = _get(f"{base}/dtm/correlations.json")
    assert status == 200
    rates = json.loads(body)
    assert rates["correlations_total"] == PER_TASK * N_TASKS
    assert len(rates["workers"]) == 2
    assert sum(w["correlations_total"] for w in rates["workers"].values()) == PER_TASK * N_TASKS
    # Every task finished within the rate's window of the last heartbeat, so the rate is at
    # least the worker's count over the whole window.
    for worker in rates["workers"].values():
        assert worker["correlations_per_second"] * RATE_WINDOW_S >= worker["correlations_total"]
    assert rates["correlations_per_second"] > 0


def test_workers_page_lists_the_custom_metrics(cluster: tuple[distributed.Client, str]) -> None:
    client, base = cluster

    def columns(dask_scheduler: distributed.Scheduler) -> list[str]:
        return list(WorkerTable(dask_scheduler).extra_names)

    assert {RATE_METRIC, TOTAL_METRIC} <= set(client.run_on_scheduler(columns))
    status, body = _get(f"{base}/workers")
    assert status == 200 and b"bokeh" in body.lower()


@pytest.mark.skipif(chromium_path() is None, reason="chromium not installed (CI installs it)")
def test_dtm_page_shows_the_rate_in_a_browser(cluster: tuple[distributed.Client, str]) -> None:
    _, base = cluster
    text_js = """(() => { const out = []; const walk = (root) => { out.push(root.textContent || "");
      for (const el of root.querySelectorAll("*")) { if (el.shadowRoot) walk(el.shadowRoot); } };
      walk(document); return out.join(" "); })()"""

    async def script(page: Page) -> Any:
        await page.wait_for(f"({text_js}).includes('correlations counted')", 30)
        return await page.evaluate(text_js)

    text = run_page(f"{base}/dtm", script)
    assert f"{PER_TASK * N_TASKS:,} correlations counted" in text
    assert "on 2 workers" in text


def test_lost_and_returning_workers_are_counted() -> None:
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
        ) as local,
        distributed.Client(local) as client,
    ):
        install(client)
        assert worker_rates(client)["workers_lost"] == 0
        (address,) = client.scheduler_info()["workers"]
        # The nanny restarts its worker: it leaves the cluster and comes back under its name.
        client.restart_workers([address])
        client.wait_for_workers(1)
        deadline = time.monotonic() + 30
        while worker_rates(client)["workers_returned"] < 1:
            assert time.monotonic() < deadline, "the returning worker was never counted"
            time.sleep(0.2)
        rates = worker_rates(client)
        assert rates["workers_lost"] == 1 and rates["workers_returned"] == 1
        assert len(rates["workers"]) == 1
