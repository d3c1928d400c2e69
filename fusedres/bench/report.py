"""The bench's outputs: terminal tables, results.md and results.json.

Rows are plain dicts (harness._row, plus add_derived's pct_copy / vs_eager / vs_compile); every
field but case, direction, provider and median_ms may be missing or None, and shows as "-".
"""

from __future__ import annotations

import json
import os

from fusedres.bench.harness import DIRECTIONS, geomean

SCHEMA = 1


# --- cell formatting ----------------------------------------------------------------------------


def fmt_ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v >= 100 else f"{v:.3f}" if v >= 1 else f"{v:.4f}"


def fmt_float(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def fmt_speedup(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fmt_err(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def fmt_peak(v, device_type: str | None) -> str:
    if v is None:
        return "n/a" if device_type == "cpu" else "-"
    return f"{v:.1f}"


# --- generic tables -----------------------------------------------------------------------------


def text_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    cell = lambda i, c: str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i])
    lines = ["  ".join(cell(i, h) for i, h in enumerate(headers)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell(i, c) for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def blank_repeats(rows: list[list[str]]) -> list[list[str]]:
    """Shows the first column only where it changes: a case's rows read as one block."""
    out, previous = [], None
    for r in rows:
        out.append(["" if r[0] == previous else r[0], *r[1:]])
        previous = r[0]
    return out


# --- timings ------------------------------------------------------------------------------------

TIMING_HEADERS = ["case", "dir", "provider", "ms", "GB/s", "%copy", "vs eager", "vs compile", "peak MB"]
TIMING_RIGHT = {3, 4, 5, 6, 7, 8}


def sorted_timings(rows: list[dict]) -> list[dict]:
    """In run order of the cases, then by direction, then in provider order."""
    case_order = {c: i for i, c in enumerate(dict.fromkeys(r["case"] for r in rows))}
    dir_order = {d: i for i, d in enumerate(DIRECTIONS)}
    return sorted(rows, key=lambda r: (case_order[r["case"]], dir_order.get(r["direction"], len(dir_order))))


def timing_cells(rows: list[dict], device_type: str | None = None) -> list[list[str]]:
    return [
        [
            r["case"],
            r["direction"],
            r["provider"],
            fmt_ms(r["median_ms"]),
            fmt_float(r.get("gbps")),
            fmt_float(r.get("pct_copy"), ".0f"),
            fmt_speedup(r.get("vs_eager")),
            fmt_speedup(r.get("vs_compile")),
            fmt_peak(r.get("peak_mb"), device_type),
        ]
        for r in sorted_timings(rows)
    ]


def timing_table(rows: list[dict], device_type: str | None = None) -> str:
    return text_table(TIMING_HEADERS, blank_repeats(timing_cells(rows, device_type)), TIMING_RIGHT)


# --- parity -------------------------------------------------------------------------------------

PARITY_HEADERS = ["case", "provider", "max abs err", "max rel err", "eager abs", "eager rel", "worst", "verdict"]
PARITY_RIGHT = {2, 3, 4, 5}


def verdict(p: dict) -> str:
    if p.get("note"):
        return p["note"][:80]
    if p.get("error"):
        return f"{'FAIL' if p.get('judged') else 'error'}: {p['error']}"[:80]
    if p.get("pass") is None:
        return "(yardstick)"
    if p.get("judged"):
        return "ok" if p["pass"] else "FAIL"
    return "(within rule)" if p["pass"] else "(outside rule)"


def parity_cells(parity_rows: list[dict]) -> list[list[str]]:
    return [
        [
            p["case"],
            p["provider"],
            fmt_err(p.get("max_abs_error")),
            fmt_err(p.get("max_rel_error")),
            fmt_err(p.get("eager_max_abs_error")),
            fmt_err(p.get("eager_max_rel_error")),
            p.get("worst", "-"),
            verdict(p),
        ]
        for p in parity_rows
    ]


def parity_table(parity_rows: list[dict]) -> str:
    return text_table(PARITY_HEADERS, blank_repeats(parity_cells(parity_rows)), PARITY_RIGHT)


# --- summary ------------------------------------------------------------------------------------


def summary_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Geometric-mean speedup over eager per provider (rows) and direction (columns)."""
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["provider"] != "eager"))
    directions = [d for d in DIRECTIONS if any(r["direction"] == d for r in rows)]
    cells = []
    for p in providers:
        means = [
            geomean([r.get("vs_eager") for r in rows if r["provider"] == p and r["direction"] == d]) for d in directions
        ]
        cells.append([p, *map(fmt_speedup, means)])
    return ["provider", *(f"{d} vs eager" for d in directions)], cells


def summary_table(rows: list[dict]) -> str:
    headers, cells = summary_cells(rows)
    return text_table(headers, cells, set(range(1, len(headers))))


# --- files --------------------------------------------------------------------------------------


def results_dict(environment: dict, args: dict, parity_rows: list, timing_rows: list, notes: list, plots=()) -> dict:
    return {
        "schema": SCHEMA,
        "environment": environment,
        "args": args,
        "parity": parity_rows,
        "timings": timing_rows,
        "notes": list(notes),
        "plots": list(plots),
    }


def write_json(path: str, results: dict) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
        f.write("\n")


def read_json(path: str) -> dict:
    with open(path) as f:
        results = json.load(f)
    if not isinstance(results, dict) or "timings" not in results:
        raise ValueError(f"{path} is not a fusedres bench results.json (no 'timings')")
    return results


ENV_KEYS = ("device", "torch", "triton", "cuda", "fusedres", "commit", "threads", "copy_gbps", "timestamp")


def environment_cells(env: dict) -> list[list[str]]:
    """The environment block every results.md opens with: key, value."""
    return [[k, fmt_float(env[k]) if k == "copy_gbps" and env[k] else str(env.get(k))] for k in ENV_KEYS if k in env]


def markdown(results: dict) -> str:
    env, rows = results["environment"], results["timings"]
    device_type = env.get("device_type")
    title = f"# fusedres benchmark: {env.get('device', '?')}, {str(env.get('timestamp', ''))[:10]}"
    parts = [title, markdown_table(["", ""], environment_cells(env))]
    if rows:
        headers, cells = summary_cells(rows)
        parts += [
            "## Speedup over eager (geometric mean over cases)",
            markdown_table(headers, cells, set(range(1, len(headers)))),
        ]
    if results["parity"]:
        parts += [
            "## Parity against float64",
            "Rule: |ours - ref64| <= 2 |eager - ref64| + atol per output and grad; rel = abs / max |ref64|.",
            markdown_table(PARITY_HEADERS, blank_repeats(parity_cells(results["parity"])), PARITY_RIGHT),
        ]
    if rows:
        parts.append("## Timings (median)")
        for op in dict.fromkeys(r.get("op", "-") for r in rows):
            op_rows = [r for r in rows if r.get("op", "-") == op]
            cells = blank_repeats(timing_cells(op_rows, device_type))
            parts += [f"### {op}", markdown_table(TIMING_HEADERS, cells, TIMING_RIGHT)]
        methods = sorted({r.get("method") for r in rows if r.get("method")})
        parts.append(f"Timed with: {', '.join(methods)}. GB/s from fusedres/bench/byte_model.py.")
    if results.get("plots"):
        parts.append("## Plots")
        parts += [f"![{os.path.splitext(p)[0]}]({p})" for p in results["plots"]]
    if results.get("notes"):
        parts += ["## Notes", "\n".join(f"- {n}" for n in results["notes"])]
    return "\n\n".join(parts) + "\n"


def write_markdown(path: str, results: dict) -> None:
    with open(path, "w") as f:
        f.write(markdown(results))
