"""``dtm browse``: pan and zoom the maps of a results store in the browser (a bokeh server).

Choose a micrograph and a map; the view is read from zarr chunk by chunk: after each pan
or zoom only the visible window (plus a margin) is read, at the coarsest resolution that
still gives at least one map pixel per screen pixel — a pyramid level for ``scaled_mip``
and ``mip`` (block maxima, so no peak is lost), a strided read of the full-resolution map
for the others. Picked particles are circled; hovering one shows its row of the peak table.

``GET /status`` returns JSON describing what the server has loaded (micrographs, peaks, the
last window sent to a browser), for scripts and tests.

Safety: micrograph names and paths are shown as text, never as HTML (they come from
configurations and tables written by others). The server answers only requests whose
``Host`` is this machine (``localhost``, 127.0.0.1, ::1), the ``--address`` it listens on or
a host of ``--allow-websocket-origin``; others get 403 (a page on another site that
resolves its name to 127.0.0.1 cannot read the results: DNS rebinding).
"""

from __future__ import annotations

import errno
import math
import os
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from tornado.httputil import split_host_and_port
from tornado.web import RequestHandler

from dtm.errors import ConfigError, InputError, MissingExtra
from dtm.io.pyramid import PYRAMID_MAPS
from dtm.io.results import MicrographResults, open_micrographs
from dtm.programs.peaks import read_peaks
from dtm.schema import MAP_NAMES

try:
    from bokeh.application import Application
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.document import Document
    from bokeh.events import Event, RangesUpdate
    from bokeh.layouts import column, row
    from bokeh.models import BoxZoomTool, ColumnDataSource, HoverTool, LinearColorMapper, Range1d
    from bokeh.models.annotations import ColorBar
    from bokeh.models.widgets import Div, Select
    from bokeh.plotting import figure
    from bokeh.server.server import Server
except ModuleNotFoundError as error:  # the viz extra is not installed
    raise MissingExtra(f"dtm browse needs {error.name}: pip install 'dtm[viz]'") from None

#: Maps offered, in menu order: the scaled MIP first.
MAPS = ("scaled_mip", *(name for name in MAP_NAMES if name != "scaled_mip"))
#: Width and height of the plot in screen pixels; views are read at about this resolution.
PLOT_PIXELS = 800
#: Fraction of the view added on each side when reading, so short pans need no read.
MARGIN = 0.25
#: Peak-table columns shown on hover.
HOVER_COLUMNS = (
    "particle_index",
    "pos_x",
    "pos_y",
    "pos_x_img",
    "pos_y_img",
    "scaled_mip",
    "mip",
    "correlation_mean",
    "correlation_variance",
    "phi",
    "theta",
    "psi",
    "relative_defocus",
)


@dataclass
class BrowseState:
    """What the server shares between sessions, and what it reports at ``/status``."""

    results: str
    micrographs: dict[str, MicrographResults]
    peaks: pd.DataFrame
    peaks_source: str
    plot_pixels: int = PLOT_PIXELS
    sessions: int = 0
    reads: int = 0
    last_view: dict[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        return {
            "results": self.results,
            "micrographs": list(self.micrographs),
            "peaks": {
                name: int((self.peaks["micrograph_name"] == name).sum())
                for name in self.micrographs
            },
            "peaks_source": self.peaks_source,
            "sessions": self.sessions,
            "reads": self.reads,
            "last_view": self.last_view,
        }


def choose_factor(view_pixels: float, factors: list[int], plot_pixels: int = PLOT_PIXELS) -> int:
    """The coarsest downsampling factor that keeps a map pixel per screen pixel.

    Parameters
    ----------
    view_pixels
        Extent of the view in full-resolution map pixels (the larger of width, height).
    factors
        Available factors (1 = full resolution).
    """
    wanted = view_pixels / plot_pixels
    return max([f for f in factors if f <= wanted], default=1)


def read_window(
    micrograph: MicrographResults,
    map_name: str,
    y_range: tuple[float, float],
    x_range: tuple[float, float],
    plot_pixels: int = PLOT_PIXELS,
) -> tuple[np.ndarray, int, int, int]:
    """Read the part of a map that covers a view, at the resolution the view needs.

    Parameters
    ----------
    micrograph
        The micrograph's results.
    map_name
        A map of :data:`MAPS`.
    y_range, x_range
        The view in full-resolution map pixels (any order, may exceed the map).

    Returns
    -------
    data : numpy.ndarray
        ``(h, w)`` float32 block; its pixel ``(i, j)`` covers full-resolution pixels
        ``[y0 + i F, y0 + (i + 1) F) × [x0 + j F, x0 + (j + 1) F)``.
    factor, y0, x0 : int
        ``F`` and the full-resolution pixel of the block's top-left corner.
    """
    full = micrograph.dataset[map_name]
    height, width = full.shape
    (ya, yb), (xa, xb) = sorted(y_range), sorted(x_range)
    view = max(yb - ya, xb - xa)
    ya, yb = ya - MARGIN * (yb - ya), yb + MARGIN * (yb - ya)
    xa, xb = xa - MARGIN * (xb - xa), xb + MARGIN * (xb - xa)
    levels = {1: full}
    if map_name in PYRAMID_MAPS:
        levels |= {f: level[map_name] for f, level in micrograph.pyramid.items()}
    factor = choose_factor(view, sorted(levels), plot_pixels)
    level = levels[factor]
    ny, nx = level.shape
    iy0, iy1 = max(math.floor(ya / factor), 0), min(math.ceil(yb / factor), ny)
    ix0, ix1 = max(math.floor(xa / factor), 0), min(math.ceil(xb / factor), nx)
    iy1, ix1 = max(iy1, iy0 + 1), max(ix1, ix0 + 1)
    stride = 1
    if factor == 1:
        # No pyramid for this map: read the window and keep every stride-th pixel.
        stride = max(1, int(view // plot_pixels))
    data = level.isel(y=slice(iy0, iy1, stride), x=slice(ix0, ix1, stride)).values
    return data.astype(np.float32), factor * stride, iy0 * factor, ix0 * factor


def _color_limits(data: np.ndarray) -> tuple[float, float]:
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1.0, 100.0])
    return float(low), float(max(high, low + 1e-6))


def _document(state: BrowseState, doc: Document) -> None:
    """One browser session: widgets, the map, the peaks, and the reads on pan/zoom."""
    state.sessions += 1
    names: list[str | tuple[Any, str]] = list(state.micrographs)
    pick_micrograph = Select(title="micrograph", value=next(iter(state.micrographs)), options=names)
    pick_map = Select(title="map", value=MAPS[0], options=list[str | tuple[Any, str]](MAPS))
    info = Div(text="", render_as_text=True)  # micrograph names are text, never HTML
    image = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []})
    peaks = ColumnDataSource({name: [] for name in HOVER_COLUMNS})
    mapper = LinearColorMapper(palette="Greys256")
    plot = figure(
        x_range=Range1d(start=0, end=1),
        y_range=Range1d(start=1, end=0),
        tools="pan,wheel_zoom,reset,save",
        active_scroll="wheel_zoom",
        x_axis_label="x (map pixel)",
        y_axis_label="y (map pixel)",
    )
    plot.add_tools(BoxZoomTool(match_aspect=True))
    # bokeh's type stubs lack the color_mapper keyword of image().
    plot.image(  # type: ignore[call-arg]
        image="image", x="x", y="y", dw="dw", dh="dh", source=image, color_mapper=mapper
    )
    circles = plot.scatter(
        x="pos_x",
        y="pos_y",
        source=peaks,
        size=18,
        marker="circle",
        fill_alpha=0.0,
        line_color="#ff3b30",
        line_width=2,
    )
    plot.add_tools(
        HoverTool(renderers=[circles], tooltips=[(name, f"@{name}") for name in HOVER_COLUMNS])
    )
    plot.add_layout(ColorBar(color_mapper=mapper, width=12), "right")

    def show(y_range: tuple[float, float], x_range: tuple[float, float]) -> None:
        micrograph = state.micrographs[pick_micrograph.value]
        data, factor, y0, x0 = read_window(
            micrograph, pick_map.value, y_range, x_range, state.plot_pixels
        )
        h, w = data.shape
        # Pixel edges at -0.5: the map pixel (y, x) is centred on the coordinate (y, x).
        image.data = {
            "image": [data],
            "x": [x0 - 0.5],
            "y": [y0 - 0.5],
            "dw": [w * factor],
            "dh": [h * factor],
        }
        mapper.low, mapper.high = _color_limits(data)
        state.reads += 1
        state.last_view = {
            "micrograph": micrograph.name,
            "map": pick_map.value,
            "factor": factor,
            "origin": [y0, x0],
            "shape": [h, w],
            "finite_pixels": int(np.isfinite(data).sum()),
            "peaks_shown": len(peaks.data["pos_x"]),
        }
        level = "full resolution" if factor == 1 else f"1/{factor} (block maxima or stride)"
        info.text = f"{micrograph.name}: {pick_map.value}, {h} × {w} pixels read at {level}"

    def select() -> None:
        micrograph = state.micrographs[pick_micrograph.value]
        height, width = micrograph.dataset.sizes["y"], micrograph.dataset.sizes["x"]
        table = state.peaks[state.peaks["micrograph_name"] == micrograph.name]
        peaks.data = {name: table[name].to_numpy() for name in HOVER_COLUMNS}
        # Square map pixels: the frame has the map's aspect ratio, the longer side plot_pixels.
        scale = state.plot_pixels / max(height, width)
        plot.frame_width, plot.frame_height = round(width * scale), round(height * scale)
        # The y axis points down, as rows of the map do.
        ranges = ((plot.x_range, -0.5, width - 0.5), (plot.y_range, height - 0.5, -0.5))
        for axis, start, end in ranges:
            axis.update(start=start, end=end, reset_start=start, reset_end=end)
        show((-0.5, height - 0.5), (-0.5, width - 0.5))

    def on_ranges(event: Event) -> None:
        assert isinstance(event, RangesUpdate)
        y0, y1, x0, x1 = event.y0, event.y1, event.x0, event.x1
        if y0 is None or y1 is None or x0 is None or x1 is None:
            return
        show((float(y0), float(y1)), (float(x0), float(x1)))

    pick_micrograph.on_change("value", lambda _attr, _old, _new: select())
    pick_map.on_change("value", lambda _attr, _old, _new: select())
    plot.on_event(RangesUpdate, on_ranges)
    select()
    doc.title = f"dtm browse: {state.results}"
    doc.add_root(row(column(pick_micrograph, pick_map, info, width=260), plot))


class _RefusedHostHandler(RequestHandler):
    """Every request whose ``Host`` is not allowed: 403."""

    def prepare(self) -> None:
        self.set_status(403)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("dtm browse: Host not allowed\n")


#: Hosts that always name this machine.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def allowed_hosts(address: str, allow_websocket_origin: list[str] | None) -> list[str] | None:
    """Host names (no port) the server answers: this machine, ``address`` unless it is a
    wildcard, and the hosts of ``allow_websocket_origin``; ``None`` (any host) when an
    origin is ``*``."""
    origins = list(allow_websocket_origin or [])
    if "*" in origins:
        return None
    hosts = [*LOCAL_HOSTS]
    if address and address not in ("0.0.0.0", "::", ""):
        hosts.append(address)
    hosts += [split_host_and_port(origin.split("://")[-1])[0] for origin in origins]
    return sorted({host.lower() for host in hosts})


def _refuse_other_hosts(server: Server, hosts: list[str] | None) -> None:
    """Answer 403 to every request (page, websocket, /status) with another ``Host``.

    Bokeh checks only the websocket's ``Origin``; tornado routes by host, so a rule for
    every host *but* the allowed ones, placed before bokeh's, refuses the rest.
    """
    if hosts is None:
        return
    allowed = "|".join(re.escape(host) for host in hosts)
    # tornado matches the pattern against the request's host name, lower-cased, no port.
    server._tornado.add_handlers(rf"(?!(?:{allowed})$).*", [(r".*", _RefusedHostHandler)])


class _StatusHandler(RequestHandler):
    def initialize(self, state: BrowseState) -> None:
        self.state = state

    def get(self) -> None:
        self.write(self.state.status())


def make_server(
    results: str | os.PathLike[str],
    *,
    port: int = 5006,
    address: str = "localhost",
    allow_websocket_origin: list[str] | None = None,
    plot_pixels: int = PLOT_PIXELS,
) -> Server:
    """A bokeh server (not started) browsing the results of ``dtm match``.

    Parameters
    ----------
    results
        Output directory or its ``results.zarr``: local path or fsspec URL (``s3://…``).
    port
        HTTP port; 0 picks a free one (``server.port`` tells which).
    address
        Interface to listen on; ``localhost`` keeps the results private to this machine.
    allow_websocket_origin
        Hosts (``host[:port]``) whose pages may connect, e.g. the name of a login node
        reached through a tunnel; default ``localhost:PORT`` only. Requests whose ``Host``
        is none of these, ``address`` or this machine are refused (403).
    plot_pixels
        Longer side of the plot in screen pixels.
    """
    micrographs = {m.name: m for m in open_micrographs(results)}
    if not micrographs:
        raise InputError(f"{results}: the results store holds no micrograph")
    table, source = read_peaks(results)
    state = BrowseState(str(results), micrographs, table, source, plot_pixels)
    application = Application(FunctionHandler(partial(_document, state)))
    try:
        server = Server(
            {"/": application},
            port=port,
            address=address,
            allow_websocket_origin=allow_websocket_origin,
            extra_patterns=[(r"/status", _StatusHandler, {"state": state})],
        )
        _refuse_other_hosts(server, allowed_hosts(address, allow_websocket_origin))
        return server
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"--port {port}: cannot listen on {address}:{port} ({error.strerror}); "
                "choose another port, or 0 for any free one"
            ) from None
        reason = error.strerror or str(error)
        raise ConfigError(f"--address {address}: cannot listen there ({reason})") from None


def browse(
    results: str | os.PathLike[str],
    *,
    port: int = 5006,
    address: str = "localhost",
    show: bool = False,
    allow_websocket_origin: list[str] | None = None,
) -> None:
    """Serve the browser of ``results`` until interrupted (the ``dtm browse`` command)."""
    server = make_server(
        results, port=port, address=address, allow_websocket_origin=allow_websocket_origin
    )
    server.start()
    print(f"dtm browse: serving {results} at http://{address}:{server.port}/ (Ctrl-C to stop)")
    if show:
        server.io_loop.add_callback(server.show, "/")
    server.io_loop.start()
