"""``dtm browse``: window reads, the bokeh document, and the page in headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import matplotlib.image
import numpy as np
import pytest
from bokeh.client import pull_session
from bokeh.document import Document
from bokeh.models import ColumnDataSource, Div, HoverTool, Select
from bokeh.server.server import Server
from headless_chromium import Page, chromium_path, run_page
from synthetic_results import write_results
from tornado.ioloop import IOLoop

from dtm.io.pyramid import max_pool
from dtm.io.results import open_micrographs
from dtm.io.tables import read_table
from dtm.programs.browse import BrowseState, _document, choose_factor, make_server, read_window
from dtm.programs.peaks import read_peaks

#: Map 600 × 520 on a 200-pixel plot: the whole map needs the 2× level, a zoom full resolution.
SHAPE = (600, 520)
PLOT = 200


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_results(tmp_path_factory.mktemp("browse") / "run", names=("m1", "m2"), shape=SHAPE)


@contextlib.contextmanager
def running_server(results: str | Path) -> Iterator[Server]:
    """The browser's server on a free port, its IO loop in a background thread."""
    started = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        holder["server"] = make_server(results, port=0, plot_pixels=PLOT)
        holder["server"].start()
        started.set()
        holder["server"].io_loop.start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield holder["server"]
    finally:
        loop: IOLoop = holder["server"].io_loop
        loop.add_callback(holder["server"].stop)
        loop.add_callback(loop.stop)
        thread.join(10)


def test_choose_factor_keeps_a_map_pixel_per_screen_pixel() -> None:
    assert choose_factor(800, [1, 2, 4], plot_pixels=800) == 1
    assert choose_factor(1700, [1, 2, 4], plot_pixels=800) == 2
    assert choose_factor(100_000, [1, 2, 4], plot_pixels=800) == 4
    assert choose_factor(3000, [1], plot_pixels=800) == 1


def test_read_window_reads_the_view_at_the_resolution_it_needs(results: Path) -> None:
    micrograph = open_micrographs(results)[0]
    full = micrograph.dataset["scaled_mip"].values
    # A small view: full resolution, the view plus a 25 % margin, values untouched.
    data, factor, y0, x0 = read_window(micrograph, "scaled_mip", (100, 140), (200, 240), PLOT)
    assert (factor, y0, x0) == (1, 90, 190)
    np.testing.assert_array_equal(data, full[90:150, 190:250])
    # The whole map: the 2× level, block maxima of the full map.
    data, factor, y0, x0 = read_window(micrograph, "scaled_mip", (600, 0), (0, 520), PLOT)
    assert (factor, y0, x0) == (2, 0, 0)
    np.testing.assert_array_equal(data, max_pool(full, 2))
    # A map without pyramid: strided full-resolution pixels.
    psi = micrograph.dataset["psi"].values
    data, factor, _, _ = read_window(micrograph, "psi", (0, 600), (0, 520), PLOT)
    assert factor == 3
    np.testing.assert_array_equal(data, psi[::3, ::3])


def test_document_circles_the_peaks_with_their_table_on_hover(results: Path) -> None:
    micrographs = {m.name: m for m in open_micrographs(results)}
    table, source = read_peaks(results)
    state = BrowseState(str(results), micrographs, table, source, plot_pixels=PLOT)
    doc = Document()
    _document(state, doc)
    [hover] = [tool for tool in doc.select({"type": HoverTool}) if isinstance(tool, HoverTool)]
    tooltips: Any = hover.tooltips
    assert ("scaled_mip", "@scaled_mip") in tooltips
    assert ("relative_defocus", "@relative_defocus") in tooltips
    sources = [s for s in doc.select({"type": ColumnDataSource}) if isinstance(s, ColumnDataSource)]
    [peak_source] = [s for s in sources if len(s.data.get("pos_x", []))]
    expected = read_table(results / "peaks.csv").query("micrograph_name == 'm1'")
    np.testing.assert_array_equal(peak_source.data["pos_x"], expected["pos_x"])
    np.testing.assert_array_equal(peak_source.data["scaled_mip"], expected["scaled_mip"])
    renderers: Any = hover.renderers
    assert [r.data_source for r in renderers] == [peak_source]
    assert state.last_view["factor"] == 2 and state.reads == 1


def _status(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://localhost:{server.port}/status") as response:
        return dict(json.load(response))


#: Screen position of map pixel (y, x) in the page: bokeh's own scales of the plot's frame.
_SCREEN = """(() => {{ for (const v of Bokeh.index.all_views()) {{
  if (v.model.type === "Figure") {{ const c = v.el.getBoundingClientRect();
    return [c.left + v.frame.x_scale.compute({x}), c.top + v.frame.y_scale.compute({y})]; }} }}
  return null; }})()"""
#: Text of the page including bokeh's shadow DOM (where tooltips are drawn).
_ALL_TEXT = """(() => { const out = []; const walk = (root) => { out.push(root.textContent || "");
  for (const el of root.querySelectorAll("*")) { if (el.shadowRoot) walk(el.shadowRoot); } };
  walk(document); return out.join(" "); })()"""
_READY = (
    "window.Bokeh !== undefined && Bokeh.documents.length > 0"
    " && Bokeh.documents[0].roots().length > 0"
)


@pytest.mark.skipif(chromium_path() is None, reason="chromium not installed (CI installs it)")
def test_page_in_headless_chromium_shows_map_peaks_hover_and_zoom(
    results: Path, tmp_path: Path
) -> None:
    peaks = read_table(results / "peaks.csv").query("micrograph_name == 'm1'")
    first = peaks.iloc[0]

    async def script(page: Page) -> dict[str, Any]:
        await page.wait_for(_READY, 30)
        await page.wait_for(f"({_SCREEN.format(x=0, y=0)}) !== null", 10)
        await asyncio.sleep(1.0)  # let the canvas paint
        shots = {"loaded": await page.screenshot(tmp_path / "loaded.png")}
        x, y = await page.evaluate(_SCREEN.format(x=first["pos_x"], y=first["pos_y"]))
        await page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        await asyncio.sleep(0.5)
        text = await page.evaluate(_ALL_TEXT)
        loaded = _status(server)
        await page.call(
            "Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=-800
        )
        await asyncio.sleep(1.5)
        return {"shots": shots, "text": text, "loaded": loaded, "zoomed": _status(server)}

    with running_server(results) as server:
        outcome = run_page(f"http://localhost:{server.port}/", script)

    loaded = outcome["loaded"]
    assert loaded["sessions"] == 1 and loaded["reads"] == 1
    assert loaded["peaks"] == {"m1": 3, "m2": 3} == {"m1": len(peaks), "m2": 3}
    view = loaded["last_view"]
    assert (view["micrograph"], view["map"], view["factor"]) == ("m1", "scaled_mip", 2)
    assert view["shape"] == [300, 260] and view["finite_pixels"] == 300 * 260
    assert view["peaks_shown"] == 3

    image = matplotlib.image.imread(outcome["shots"]["loaded"])[..., :3]
    grey = (np.ptp(image, axis=2) < 0.02) & (image[..., 0] < 0.9)  # the map's grey pixels
    assert grey.sum() > 0.5 * 160 * 173 and image[grey].std() > 0.05
    red = (image[..., 0] > 0.85) & (image[..., 1] < 0.45) & (image[..., 2] < 0.45)
    assert red.sum() > 3 * 20  # three circles

    # Hovering the first particle shows its row of the peak table.
    assert f"pos_x: {first['pos_x']} pos_y: {first['pos_y']}" in outcome["text"]
    assert f"particle_index: {first['particle_index']}" in outcome["text"]

    # Zooming in reads a full-resolution window around the cursor.
    zoomed = outcome["zoomed"]["last_view"]
    assert outcome["zoomed"]["reads"] >= 2
    assert zoomed["factor"] == 1
    assert zoomed["shape"][0] < SHAPE[0] and zoomed["shape"][1] < SHAPE[1]
    y0, x0 = zoomed["origin"]
    assert y0 <= first["pos_y"] < y0 + zoomed["shape"][0]
    assert x0 <= first["pos_x"] < x0 + zoomed["shape"][1]


def test_server_reads_a_remote_store(results: Path) -> None:
    fs = fsspec.filesystem("memory")
    root = f"/dtm-browse-{uuid.uuid4().hex}"
    fs.put(str(results), root, recursive=True)
    try:
        with running_server(f"memory://{root}") as server:
            # Requesting the page opens a session: the server reads the first view.
            with urllib.request.urlopen(f"http://localhost:{server.port}/") as response:
                assert b"bokeh" in response.read().lower()
            status = _status(server)
    finally:
        fs.rm(root, recursive=True)
    assert status["results"] == f"memory://{root}"
    assert status["peaks"] == {"m1": 3, "m2": 3} and status["peaks_source"] == "peaks.csv"
    assert status["reads"] == 1
    assert status["last_view"]["finite_pixels"] == 300 * 260


def test_a_port_in_use_is_a_one_line_error(results: Path, capsys: pytest.CaptureFixture) -> None:
    import socket

    from dtm.cli import main

    with socket.socket() as taken:
        taken.bind(("localhost", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["browse", str(results), "--port", str(port)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"dtm: error: --port {port}: cannot listen on localhost:{port} (")
    assert "\n" not in error
    # An address that does not resolve is blamed, not the port.
    assert main(["browse", str(results), "--port", "0", "--address", "nowhere.invalid"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dtm: error: --address nowhere.invalid: cannot listen there (")


#: A micrograph name and a results folder that are HTML: shown as text, they run nothing.
HTML_NAME = "<img src=x onerror=alert(1)>"
HTML_FOLDER = "<i>run"


@contextlib.contextmanager
def browse_process(results: Path, *args: str) -> Iterator[int]:
    """``dtm browse RESULTS --port 0 ARGS`` as a process; yields the port it serves on."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "dtm.cli", "browse", str(results), "--port", "0", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        match = re.search(r"at http://[^ ]+:(\d+)/", line)
        assert match, line + proc.stdout.read().decode() if proc.poll() is not None else line
        yield int(match.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get(port: int, path: str, host: str) -> tuple[int, str, bytes]:
    """GET ``path`` from 127.0.0.1:``port`` with the header ``Host: host``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


def test_micrograph_names_and_paths_are_shown_as_text(tmp_path: Path) -> None:
    results = write_results(tmp_path / HTML_FOLDER, names=(HTML_NAME,), shape=(120, 130))
    with browse_process(results) as port:
        status, _, page = _get(port, "/", f"localhost:{port}")
        assert status == 200
        # The page's title holds the results' path, escaped.
        assert b"&lt;i&gt;run" in page and b"<i>run" not in page and b"<img" not in page
        # The document as a browser receives it, over the websocket.
        session = pull_session(url=f"http://localhost:{port}/")
        try:
            texts = [
                model
                for model in session.document.models
                if HTML_NAME in str(getattr(model, "text", ""))
            ]
            [select] = [
                m
                for m in session.document.models
                if isinstance(m, Select) and m.title == "micrograph"
            ]
        finally:
            session.close()
        status, content_type, body = _get(port, "/status", f"127.0.0.1:{port}")
    # The name is in the info line, which renders as text, never as HTML, and in the menu
    # (a select's options are text).
    assert texts and all(isinstance(m, Div) and m.render_as_text for m in texts), texts
    assert select.value == HTML_NAME
    # /status is JSON, not HTML.
    assert status == 200 and content_type.startswith("application/json")
    assert json.loads(body)["micrographs"] == [HTML_NAME]


def test_requests_for_another_host_are_refused(results: Path) -> None:
    with browse_process(results, "--allow-websocket-origin", "login.example:8080") as port:
        for path in ("/", "/status", "/ws"):
            status, _, body = _get(port, path, "evil.example")
            assert status == 403 and b"Host not allowed" in body, (path, status, body)
            status, _, _ = _get(port, path, f"evil.example:{port}")
            assert status == 403
        # DNS rebinding: a name that resolves to 127.0.0.1 is still another host.
        assert _get(port, "/status", "localhost.evil.example")[0] == 403
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "login.example:8080"):
            assert _get(port, "/status", host)[0] == 200, host
