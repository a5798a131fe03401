"""Visualisation is an extra (``dtm[viz]``): without it ``dtm report`` and ``dtm browse``
say in one line what to install, the searches still run, and the report never switches the
matplotlib backend of the session that imports it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from synthetic_results import write_results

#: Run in a fresh interpreter: the modules named in BLOCKED cannot be imported there, as
#: where the extra is not installed.
BLOCKING = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def _run(code: str, blocked: set[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKING.format(blocked=blocked) + code],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_results(tmp_path_factory.mktemp("viz") / "run", names=("m1",))


@pytest.mark.parametrize(
    ("command", "blocked", "missing"),
    [("report", {"matplotlib"}, "matplotlib"), ("browse", {"bokeh"}, "bokeh")],
)
def test_command_without_the_extra_says_what_to_install(results, command, blocked, missing):
    code = f"from dtm.cli import main; sys.exit(main([{command!r}, {str(results)!r}]))"
    run = _run(code, blocked)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert f"dtm {command} needs {missing}" in lines[0]
    assert "pip install 'dtm[viz]'" in lines[0]
    assert "Traceback" not in run.stderr


def test_dashboard_counts_without_bokeh():
    """Without bokeh the counters are installed and the page is not (Dask's own dashboard
    needs bokeh too)."""
    code = """
import distributed
from dtm.runtime.dashboard import install
from dtm.runtime.throughput import count_correlations, worker_rates
with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
    with distributed.Client(cluster) as client:
        page = install(client)
        client.submit(count_correlations, 7, pure=False).result()
        import time
        for _ in range(100):
            if worker_rates(client)["correlations_total"] == 7:
                break
            time.sleep(0.1)
        print(page, worker_rates(client)["correlations_total"], "bokeh" in sys.modules)
"""
    run = _run(code, {"bokeh"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "7", "False"]


def test_report_leaves_the_matplotlib_backend_alone(results, tmp_path):
    code = f"""
import matplotlib
matplotlib.use("svg")
from dtm.programs.report import write_report
path = write_report({str(results)!r}, out={str(tmp_path / "report.html")!r})
print(matplotlib.get_backend(), path.stat().st_size > 0)
"""
    run = _run(code, set())
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["svg", "True"]
