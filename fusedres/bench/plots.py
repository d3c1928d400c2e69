"""PNG plots of a run: per case group (an op form at one dtype and batch), speedup over eager and
GB/s against hidden size or ResNet stage, one line per provider, a column per direction.

matplotlib is optional (the `bench` extra): without it, plots() says so and draws nothing. The
Figure API is used directly, never pyplot, so no GUI backend or global state is involved.
"""

from __future__ import annotations

import os

from fusedres.bench.environment import slug
from fusedres.bench.harness import DIRECTIONS


def matplotlib_missing() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plots"
    return None


def _group(r: dict) -> str:
    return str(r.get("group") or r.get("op") or "results")


def _x(r: dict):
    return r.get("x", r["case"])


def _x_order(values: list):
    """Numeric x (hidden sizes) ascending; anything else (stages) in run order."""
    unique = list(dict.fromkeys(values))
    return sorted(unique) if all(isinstance(v, (int, float)) for v in unique) else unique


def plot_group(rows: list[dict], title: str, path: str, copy_gbps: float | None = None) -> None:
    from matplotlib.figure import Figure

    directions = [d for d in DIRECTIONS if any(r["direction"] == d for r in rows)]
    xs = _x_order([_x(r) for r in rows])
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig = Figure(figsize=(4.2 * len(directions), 7.0), layout="constrained")
    axes = fig.subplots(2, len(directions), squeeze=False)
    for col, direction in enumerate(directions):
        for row, (key, ylabel) in enumerate((("vs_eager", "speedup over eager"), ("gbps", "GB/s"))):
            ax = axes[row][col]
            for provider in providers:
                points = {_x(r): r.get(key) for r in rows if r["provider"] == provider and r["direction"] == direction}
                pos = [i for i, x in enumerate(xs) if points.get(x) is not None]
                if pos:
                    ax.plot(pos, [points[xs[i]] for i in pos], marker="o", label=provider)
            if key == "vs_eager":
                ax.axhline(1.0, color="grey", linewidth=0.8)
                ax.set_title(direction)
            elif copy_gbps:
                ax.axhline(copy_gbps, color="grey", linestyle="--", linewidth=0.8, label="copy bandwidth")
            ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=30 if len(xs) > 4 else 0)
            ax.set_ylabel(ylabel)
            if row == 1 and rows[0].get("x_label"):
                ax.set_xlabel(rows[0]["x_label"])
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    axes[1][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def plots(rows: list[dict], out_dir: str, stem: str, device_label: str, copy_gbps: float | None) -> list[str]:
    """Writes <stem>-<group>.png per group of rows; returns the file names written."""
    written = []
    for group in dict.fromkeys(map(_group, rows)):
        name = f"{stem}-{slug(group)}.png"
        group_rows = [r for r in rows if _group(r) == group]
        plot_group(group_rows, f"{group} on {device_label}", os.path.join(out_dir, name), copy_gbps)
        written.append(name)
    return written
