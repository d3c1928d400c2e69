"""`--compare OLD.json NEW.json`: per case, direction and provider, old and new median time and
their ratio, flagging changes beyond a threshold, and parity verdicts that turned to failures."""

from __future__ import annotations

from fusedres.bench import report

DEFAULT_THRESHOLD = 0.05


def _key(r: dict) -> tuple:
    return (r["case"], r["direction"], r["provider"])


def _flag(ratio: float, threshold: float) -> str:
    if ratio > 1 + threshold:
        return "REGRESSION"
    return "faster" if ratio < 1 - threshold else ""


def compare_rows(old: list[dict], new: list[dict], threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    """One entry per (case, direction, provider) in either run; ratio = new / old time, so above
    1 + threshold is a regression."""
    old_by, new_by = {_key(r): r for r in old}, {_key(r): r for r in new}
    out = []
    for key in dict.fromkeys([*old_by, *new_by]):
        o, n = old_by.get(key), new_by.get(key)
        entry = {"case": key[0], "direction": key[1], "provider": key[2]}
        entry["old_ms"] = o["median_ms"] if o else None
        entry["new_ms"] = n["median_ms"] if n else None
        if o and n and o["median_ms"] > 0:
            entry["ratio"] = n["median_ms"] / o["median_ms"]
            entry["flag"] = _flag(entry["ratio"], threshold)
        else:
            entry["ratio"] = None
            entry["flag"] = "only in old" if o else "only in new"
        out.append(entry)
    return out


def parity_regressions(old: list[dict], new: list[dict]) -> list[str]:
    """Providers that passed the parity rule before and do not now."""
    before = {(p["case"], p["provider"]): p.get("pass") for p in old}
    return [
        f"{p['case']} {p['provider']}: parity passed before, fails now"
        for p in new
        if p.get("pass") is False and before.get((p["case"], p["provider"])) is True
    ]


def _env_line(label: str, env: dict) -> str:
    keys = ("device", "torch", "fusedres", "commit", "timestamp")
    return f"{label}: " + ", ".join(f"{k} {env.get(k)}" for k in keys)


def compare(old: dict, new: dict, threshold: float = DEFAULT_THRESHOLD) -> tuple[str, int]:
    """The regression table as text, and the number of regressions (timing and parity)."""
    entries = compare_rows(old["timings"], new["timings"], threshold)
    cells = [
        [
            e["case"],
            e["direction"],
            e["provider"],
            report.fmt_ms(e["old_ms"]),
            report.fmt_ms(e["new_ms"]),
            "-" if e["ratio"] is None else f"{e['ratio']:.3f}",
            e["flag"],
        ]
        for e in sorted(entries, key=lambda e: -(e["ratio"] or 0))
    ]
    table = report.text_table(["case", "dir", "provider", "old ms", "new ms", "new/old", ""], cells, {3, 4, 5})
    parity = parity_regressions(old.get("parity", []), new.get("parity", []))
    regressions = sum(e["flag"] == "REGRESSION" for e in entries)
    faster = sum(e["flag"] == "faster" for e in entries)
    lines = [
        _env_line("old", old.get("environment", {})),
        _env_line("new", new.get("environment", {})),
        *(
            ["warning: the runs are on different devices; their times do not compare"]
            if old.get("environment", {}).get("device") != new.get("environment", {}).get("device")
            else []
        ),
        "",
        table,
        "",
        f"{regressions} slower and {faster} faster by more than {threshold:.0%}, "
        f"{sum(e['flag'] == '' for e in entries)} within, {sum(e['ratio'] is None for e in entries)} in one run "
        f"only; {len(parity)} parity regression(s)",
        *parity,
    ]
    return "\n".join(lines), regressions + len(parity)
