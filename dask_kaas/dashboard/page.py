"""The KaaS page of the scheduler's Bokeh dashboard."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Scheduler

ROUTE = "/kaas"
UPDATE_MS = 500
HISTORY = 240  # samples of the hit/miss/eviction rates kept per worker


def _short(addr: str) -> str:
    return addr.replace("tcp://", "")


HELD_NOTE = (
    "<h3>Dispatch</h3><p>Kernel graphs wait in the scheduler, per tenant and in fair "
    "order, until a worker has fewer graphs in flight than its limit; only then is "
    "their worker chosen. While they wait they are restricted to a reserved "
    "address, so Dask's own progress bar and task stream draw them as "
    "<code>no-worker</code>: that is the held backlog above, not a fault.</p>")


def kaas_doc(scheduler: Scheduler, extra: dict, doc: Any) -> None:
    """Build the page for one browser session; it refreshes itself."""
    from bokeh.layouts import column, row
    from bokeh.models import (
        ColumnDataSource,
        DataTable,
        Div,
        HoverTool,
        NumberFormatter,
        TableColumn,
    )
    from bokeh.palettes import Category10_10
    from bokeh.plotting import figure

    memory = ColumnDataSource({"worker": [], "const_mib": [], "other_mib": [], "free_mib": [],
                               "capacity_mib": []})
    tenants = ColumnDataSource({"tenant": [], "held": [], "graphs_run": [], "errors": [],
                                "rps": [], "p50_ms": [], "p99_ms": [], "queue_wait_ms": [],
                                "mib_to_device": []})
    in_flight = ColumnDataSource({"worker": [], "in_flight": [], "limit": []})
    resident = ColumnDataSource({"worker": [], "buffer": [], "kib": []})
    timeline = ColumnDataSource({"worker": [], "start": [], "end": [], "tenant": [],
                                 "graph": [], "color": []})

    mem_fig = figure(title="Device memory per worker (MiB)", y_range=[], height=220,
                     sizing_mode="stretch_width", tools="", toolbar_location=None)
    mem_fig.hbar_stack(["const_mib", "other_mib", "free_mib"], y="worker", height=0.6,
                       source=memory, color=["#1f77b4", "#ff7f0e", "#e0e0e0"],
                       legend_label=["const (weights)", "other cached / in use", "free"])
    mem_fig.legend.location = "bottom_right"
    mem_fig.legend.orientation = "horizontal"

    rate_fig = figure(title="Cache hits, misses and evictions per second", height=240,
                      x_axis_type="datetime", sizing_mode="stretch_width",
                      tools="xpan,xwheel_zoom,reset", toolbar_location="above")
    rate_lines: dict[str, Any] = {}

    tl_fig = figure(title="Graphs run per worker (colour: tenant)", y_range=[], height=240,
                    x_axis_type="datetime", sizing_mode="stretch_width",
                    tools="xpan,xwheel_zoom,reset", toolbar_location="above")
    tl_fig.hbar(y="worker", left="start", right="end", height=0.7, color="color",
                source=timeline, line_color=None)
    tl_fig.add_tools(HoverTool(tooltips=[("tenant", "@tenant"), ("graph", "@graph"),
                                         ("worker", "@worker")]))

    fmt = NumberFormatter(format="0.0")
    tenant_table = DataTable(source=tenants, height=200, sizing_mode="stretch_width",
                             index_position=None, columns=[
        TableColumn(field="tenant", title="tenant"),
        TableColumn(field="held", title="held in the scheduler"),
        TableColumn(field="graphs_run", title="graphs run"),
        TableColumn(field="errors", title="errors"),
        TableColumn(field="rps", title="requests/s", formatter=fmt),
        TableColumn(field="p50_ms", title="p50 ms", formatter=fmt),
        TableColumn(field="p99_ms", title="p99 ms", formatter=fmt),
        TableColumn(field="queue_wait_ms", title="queue wait p50 ms", formatter=fmt),
        TableColumn(field="mib_to_device", title="MiB to device", formatter=fmt)])
    resident_table = DataTable(source=resident, height=200, sizing_mode="stretch_width",
                               index_position=None, columns=[
        TableColumn(field="worker", title="worker"),
        TableColumn(field="buffer", title="buffer (Dask key or content hash)"),
        TableColumn(field="kib", title="KiB", formatter=fmt)])

    flight_table = DataTable(source=in_flight, height=120, sizing_mode="stretch_width",
                             index_position=None, columns=[
        TableColumn(field="worker", title="worker"),
        TableColumn(field="in_flight", title="graphs in flight"),
        TableColumn(field="limit", title="limit: slots x (1 + prefetch)")])

    palette = Category10_10
    tenant_colors: dict[str, str] = {}
    history: dict[str, deque] = defaultdict(lambda: deque(maxlen=HISTORY))
    last: dict[str, tuple[float, int, int, int]] = {}

    def update() -> None:
        plugin = scheduler.extensions.get("kaas")
        if plugin is None:
            return
        st = plugin.stats()
        now = time.time()
        workers = sorted(st["workers"])
        names = [_short(w) for w in workers]
        mib = 2**20
        mem = {"worker": names, "const_mib": [], "other_mib": [], "free_mib": [],
               "capacity_mib": []}
        for w in workers:
            ws = st["workers"][w]
            const = ws.get("const_bytes", 0) / mib
            used = ws.get("used_bytes", 0) / mib
            cap = ws.get("capacity_bytes", 0) / mib
            mem["const_mib"].append(const)
            mem["other_mib"].append(max(0.0, used - const))
            mem["free_mib"].append(max(0.0, cap - used))
            mem["capacity_mib"].append(cap)
            counts = (now, ws["hits"], ws["misses"], ws["evictions"])
            prev = last.get(w)
            if prev is not None and now > prev[0]:
                dt = now - prev[0]
                history[w].append((now * 1000, (counts[1] - prev[1]) / dt,
                                   (counts[2] - prev[2]) / dt, (counts[3] - prev[3]) / dt))
            last[w] = counts
        mem_fig.y_range.factors = names
        memory.data = mem
        for i, w in enumerate(workers):
            if w in rate_lines:
                continue
            src = ColumnDataSource({"time": [], "hits": [], "misses": [], "evictions": []})
            color = palette[i % len(palette)]
            rate_fig.line("time", "hits", source=src, color=color, line_width=2,
                          legend_label=f"{_short(w)} hits")
            rate_fig.line("time", "misses", source=src, color=color, line_dash="dashed",
                          legend_label=f"{_short(w)} misses")
            rate_fig.line("time", "evictions", source=src, color=color, line_dash="dotted",
                          legend_label=f"{_short(w)} evictions")
            rate_lines[w] = src
        for w, src in rate_lines.items():
            hist = list(history[w])
            src.data = {"time": [h[0] for h in hist], "hits": [h[1] for h in hist],
                        "misses": [h[2] for h in hist], "evictions": [h[3] for h in hist]}
        dispatch = st.get("dispatch", {})
        held = dispatch.get("backlog", {})
        flight = {"worker": names, "in_flight": [], "limit": []}
        for w in workers:
            ws = scheduler.workers.get(w)
            flight["in_flight"].append(dispatch.get("in_flight", {}).get(w, 0))
            flight["limit"].append(plugin.dispatch.limit(ws) if ws is not None else 0)
        in_flight.data = flight
        rows = {k: [] for k in tenants.data}
        for name, t in st["tenants"].items():
            rows["tenant"].append(name)
            rows["held"].append(held.get(name, 0))
            rows["graphs_run"].append(t["graphs_run"])
            rows["errors"].append(t["errors"])
            rows["rps"].append(t["requests_per_s"])
            rows["p50_ms"].append(t["p50_ms"] if t["p50_ms"] is not None else float("nan"))
            rows["p99_ms"].append(t["p99_ms"] if t["p99_ms"] is not None else float("nan"))
            qw = t["queue_wait_p50_ms"]
            rows["queue_wait_ms"].append(qw if qw is not None else float("nan"))
            rows["mib_to_device"].append(t["bytes_to_device"] / mib)
        tenants.data = rows
        res = {"worker": [], "buffer": [], "kib": []}
        for w, held in sorted(plugin.directory.snapshot().items()):
            for bid, nbytes in sorted(held.items()):
                res["worker"].append(_short(w))
                res["buffer"].append(bid)
                res["kib"].append(nbytes / 1024)
        resident.data = res
        tl = {k: [] for k in timeline.data}
        for run in list(plugin.timeline)[-2000:]:
            tenant = run["tenant"] or "?"
            if tenant not in tenant_colors:
                tenant_colors[tenant] = palette[len(tenant_colors) % len(palette)]
            tl["worker"].append(_short(run["worker"]))
            tl["start"].append(run["start"] * 1000)
            tl["end"].append(max(run["end"], run["start"] + 0.0005) * 1000)
            tl["tenant"].append(tenant)
            tl["graph"].append(run["graph"])
            tl["color"].append("#d62728" if run["error"] else tenant_colors[tenant])
        tl_fig.y_range.factors = names
        timeline.data = tl

    update()
    doc.add_periodic_callback(update, UPDATE_MS)
    doc.title = "Dask: KaaS"
    header = Div(text="<h2>Kernel-as-a-Service</h2><p>Device caches, tenants and graphs "
                      "of this cluster (refreshes every half second; JSON at "
                      "<a href='kaas/state.json'>kaas/state.json</a>).</p>")
    doc.add_root(column(header, row(mem_fig, sizing_mode="stretch_width"), rate_fig,
                        tl_fig, Div(text="<h3>Tenants</h3>"), tenant_table,
                        Div(text=HELD_NOTE), flight_table,
                        Div(text="<h3>Buffers resident on devices</h3>"), resident_table,
                        sizing_mode="stretch_width"))
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME


def _dask_dashboard(app: Any) -> Any:
    """The Bokeh application that serves Dask's own dashboard pages."""
    for sub in getattr(app, "applications", ()):
        if "/status" in (getattr(sub, "applications", None) or {}):
            return sub
    return None


def _template_variables(dashboard: Any) -> dict | None:
    """The template variables Dask's pages share (they hold the menu).

    Every page of Dask's dashboard is a partial of (scheduler, variables);
    the variables are one dict, read when a browser opens a page, so a page
    added to its ``pages`` list shows in the menu of every page from then on.
    """
    try:
        handler = dashboard.applications["/status"].application.handlers[0]
        variables = handler._func.args[1]
    except Exception:  # noqa: BLE001 - Dask or Bokeh internals moved: no menu entry
        return None
    return variables if isinstance(variables, dict) else None


def install_page(scheduler: Scheduler) -> bool:
    """Serve the KaaS page from a running scheduler's dashboard, with a menu
    entry.  Called when the plugin starts, so only a scheduler that runs
    dask_kaas and has a dashboard pays for importing Bokeh."""
    app = getattr(scheduler, "http_application", None)
    dashboard = _dask_dashboard(app) if app is not None else None
    if dashboard is None:  # no dashboard (or no Bokeh) on this scheduler
        return False
    if any(ROUTE in (getattr(sub, "applications", None) or {}) for sub in app.applications):
        return True
    from distributed.dashboard.core import BokehApplication
    from tornado.ioloop import IOLoop

    variables = _template_variables(dashboard)
    if variables is not None and isinstance(variables.get("pages"), list):
        pages = variables["pages"]
        if "kaas" not in pages:
            pages.insert(pages.index("info") if "info" in pages else len(pages), "kaas")
    page = BokehApplication({ROUTE: kaas_doc}, scheduler, prefix=dashboard.prefix,
                            template_variables=dict(variables or {}))
    app.add_application(page)
    page.initialize(IOLoop.current())
    page.start()
    return True
