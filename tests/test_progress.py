"""The progress line: counted from the scheduler's correlate tasks, printed once at the end."""

from __future__ import annotations

import io
import time

from distributed import Client, LocalCluster

from dtm.runtime.progress import Progress, format_duration


def test_log_gets_periodic_lines_and_one_final_line():
    out = io.StringIO()
    with (
        LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        with Progress(client, 3, 10.0, stream=out, interval=0.05, log_every=0.1):
            time.sleep(0.3)  # nothing done yet: lines with 0/3
            futures = [client.submit(abs, -i, key=f"correlate-test-{i}") for i in range(3)]
            client.gather(futures)
            time.sleep(0.5)  # all done: no more periodic lines until the end
    lines = out.getvalue().splitlines()
    assert any(" 0/3 tasks" in line for line in lines)
    assert sum(" 3/3 tasks" in line for line in lines) == 1
    assert lines[-1].startswith("[" + "#" * 30 + "] 3/3 tasks")


def test_format_duration():
    assert format_duration(62.4) == "1m02s"
    assert format_duration(3723) == "1h02m03s"
