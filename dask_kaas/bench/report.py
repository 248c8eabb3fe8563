"""Benchmark output: a terminal table, the JSON document and a PNG plot."""

from __future__ import annotations

import json
from typing import Any

COLUMNS = [("mode", "{:<18}"), ("tenants", "{:>7}"), ("requests", "{:>8}"),
           ("throughput_rps", "{:>10.1f}"), ("p50_ms", "{:>9.1f}"), ("p99_ms", "{:>9.1f}"),
           ("hit_rate", "{:>8}"), ("bytes_to_device", "{:>12}"), ("cold_starts", "{:>6}"),
           ("errors", "{:>6}")]
HEADERS = ["mode", "tenants", "requests", "req/s", "p50 ms", "p99 ms", "hits", "to device",
           "cold", "errors"]


def _fmt_bytes(n: int) -> str:
    from dask.utils import format_bytes

    return format_bytes(n)


def table(runs: list[dict[str, Any]]) -> str:
    widths = [len(f.format(0) if "d" in f or "f" in f else f.format("")) for _, f in COLUMNS]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(18) for i, (h, w) in
                       enumerate(zip(HEADERS, widths)))]
    for r in runs:
        cells = []
        for (key, fmt), w in zip(COLUMNS, widths):
            v = r.get(key)
            if key == "hit_rate":
                v = "-" if v is None else f"{100 * v:.2f}%"
            elif key == "bytes_to_device":
                v = _fmt_bytes(v)
            cells.append(fmt.format(v).rjust(w) if key != "mode" else fmt.format(v))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def write_json(path: str, doc: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=str)


def plot(path: str, runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in runs}, key=lambda m: (m != "kaas", m))
    counts = sorted({r["tenants"] for r in runs})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in modes:
        rs = sorted((r for r in runs if r["mode"] == m), key=lambda r: r["tenants"])
        xs = [r["tenants"] for r in rs]
        style = dict(marker="o", linewidth=2.5 if m == "kaas" else 1.2)
        ax1.plot(xs, [r["throughput_rps"] for r in rs], label=m, **style)
        ax2.plot(xs, [r["p99_ms"] for r in rs], label=m, **style)
    ax1.set(xlabel="tenants", ylabel="throughput (requests/s)", xticks=counts,
            title="Throughput", yscale="log")
    ax2.set(xlabel="tenants", ylabel="p99 latency (ms)", xticks=counts, title="p99 latency",
            yscale="log")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
