"""Results: one :class:`Row` per (workload, operation, provider), and their outputs.

The terminal table, the CSV, the Markdown tables and the two plots are all drawn
from the same rows, so every format shows the same numbers.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from providers import Op
from timing import Limits, Timing
from workloads import Workload


@dataclass
class Row:
    """One provider's measurement, with the figures derived from it."""

    workload: str
    kind: str
    num_tensors: int
    numel: int
    op: str
    provider: str
    bytes_moved: int  # the op's minimum memory traffic (Op.passes passes over the list)
    writes: bool  # the op writes memory: its limit is the copy bandwidth, else the read one
    median_s: float
    q1_s: float
    q3_s: float
    compile_s: Optional[float]  # torch.compile provider: first call minus a warm call
    launches: Optional[int]  # CUDA kernels per call; None off CUDA
    speedup_naive: Optional[float]
    speedup_foreach: Optional[float]
    gbps: float  # bytes_moved / median
    limit_fraction: Optional[float] = None  # gbps over the machine's limit: see with_limits
    rel_error: Optional[float] = None  # returned total norm against float64 (clipping ops)


def group_rows(workload: Workload, op: Op, timings: dict[str, Timing],
               launches: dict[str, Optional[int]],
               errors: Optional[dict[str, Optional[float]]] = None) -> list[Row]:
    """The rows of one (workload, op) group: speed-ups are against the same run's baselines."""
    nbytes = op.passes * workload.nbytes
    naive, foreach = timings.get("naive"), timings.get("foreach")
    rows = []
    for name, t in timings.items():
        rows.append(Row(
            workload=workload.name, kind=workload.kind, num_tensors=workload.num_tensors,
            numel=workload.numel, op=op.name, provider=name, bytes_moved=nbytes, writes=op.writes,
            median_s=t.median, q1_s=t.q1, q3_s=t.q3,
            compile_s=max(0.0, t.first_call - t.median) if name == "compile" else None,
            launches=launches.get(name),
            speedup_naive=naive.median / t.median if naive else None,
            speedup_foreach=foreach.median / t.median if foreach else None,
            gbps=nbytes / t.median / 1e9, rel_error=(errors or {}).get(name)))
    return rows


def with_limits(row: Row, limits: Limits) -> Row:
    """``row`` with its achieved bandwidth as a fraction of the machine's limit for it."""
    return dataclasses.replace(row, limit_fraction=row.gbps * 1e9 / limits.for_op(row.writes))


def find(rows: Iterable[Row], workload: str, op: str, provider: str) -> Optional[Row]:
    return next((r for r in rows if (r.workload, r.op, r.provider) == (workload, op, provider)), None)


# ---- formatting ---------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _times(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}x"


COLUMNS = ("workload", "op", "provider", "median ms", "IQR ms", "vs naive", "vs foreach",
           "GB/s", "% limit", "launches", "compile s", "rel err")


def _cells(row: Row) -> list[str]:
    return [row.workload, row.op, row.provider, _ms(row.median_s), _ms(row.q3_s - row.q1_s),
            _times(row.speedup_naive), _times(row.speedup_foreach), f"{row.gbps:.2f}",
            "" if row.limit_fraction is None else f"{100 * row.limit_fraction:.0f}%",
            "n/a" if row.launches is None else str(row.launches),
            "" if row.compile_s is None else f"{row.compile_s:.1f}",
            "" if row.rel_error is None else f"{row.rel_error:.1e}"]


def text_table(rows: Sequence[Row]) -> str:
    """A fixed-width table, a blank line between (workload, op) groups."""
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines, previous = [], None
    for row, line in zip([None, *rows], cells):
        key = row and (row.workload, row.op)
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path, context: dict[str, str]) -> None:
    """Every row with every field, plus the run's context (device, versions, limits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(context) + [f.name for f in dataclasses.fields(Row)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**context, **dataclasses.asdict(row)})


# ---- plots ---------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _provider_colors(rows: Sequence[Row]) -> dict[str, str]:
    """One colour per provider, the same in every panel."""
    return {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(r.provider for r in rows))}


def plot_speedups(rows: Sequence[Row], path: Path, title: str) -> bool:
    """Per operation, each provider's speed-up over the naive loop on every workload."""
    rows = [r for r in rows if r.kind != "sweep" and r.speedup_naive is not None]
    ops = list(dict.fromkeys(r.op for r in rows))
    if not ops:
        return False
    plt = _pyplot()
    colors = _provider_colors(rows)
    cols = min(3, len(ops))
    fig, axes = plt.subplots(math.ceil(len(ops) / cols), cols, squeeze=False,
                             figsize=(5.5 * cols, 3.6 * math.ceil(len(ops) / cols)))
    for ax, op in zip(axes.flat, ops):
        mine = [r for r in rows if r.op == op and r.provider != "naive"]
        loads = list(dict.fromkeys(r.workload for r in mine))
        names = list(dict.fromkeys(r.provider for r in mine))
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            xs, ys = [], []
            for i, load in enumerate(loads):
                row = find(mine, load, op, name)
                if row:
                    xs.append(i + (k - (len(names) - 1) / 2) * width)
                    ys.append(row.speedup_naive)
            ax.bar(xs, ys, width, label=name, color=colors[name])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(loads)), loads, rotation=30, ha="right", fontsize=8)
        ax.set_title(op)
        ax.set_ylabel("speed-up over naive")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_bandwidth(rows: Sequence[Row], limits: Limits, path: Path, title: str) -> bool:
    """Achieved bandwidth of the size sweep against list size, under the measured limits."""
    rows = [r for r in rows if r.kind == "sweep"]
    if not rows:
        return False
    plt = _pyplot()
    colors = _provider_colors(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in colors:
        mine = sorted((r for r in rows if r.provider == name), key=lambda r: r.bytes_moved)
        ax.plot([r.bytes_moved for r in mine], [r.gbps for r in mine], marker="o", label=name,
                color=colors[name])
    ax.axhline(limits.read / 1e9, color="black", linestyle="--", label="read limit (flat.sum())")
    ax.axhline(limits.copy / 1e9, color="grey", linestyle=":", label="copy limit")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes read per call")
    ax.set_ylabel("GB/s")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
