"""`python -m fusedres.bench`: parity and speed of every fused op against eager and torch.compile.

Exits non-zero when any provider fails the parity rule, so it doubles as a smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

import fusedres
from fusedres.bench import add_norm, batch_norm, harness
from fusedres.bench.timing import copy_bandwidth_gbps


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fusedres.bench", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small default set (default; ~2 minutes on CPU)")
    size.add_argument("--full", action="store_true", help="model-sized shapes (for GPUs)")
    p.add_argument("--ops", nargs="*", default=None, help="add_layer_norm, add_rms_norm, batch_norm_add_relu")
    p.add_argument("--backends", nargs="*", default=None, help="fusedres backends to time (default: all usable)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="directory for results.json and results.md")
    return p.parse_args(argv)


def add_speedups(rows: list[dict]) -> None:
    base = {(r["case"], r["direction"], r["provider"]): r["median_ms"] for r in rows}
    for r in rows:
        for ref in ("eager", "compile"):
            t = base.get((r["case"], r["direction"], ref))
            r[f"vs_{ref}"] = t / r["median_ms"] if t else None


def format_table(rows: list[dict], copy_gbps: float) -> str:
    header = f"{'case':<44} {'dir':<8} {'provider':<16} {'ms':>9} {'GB/s':>8} {'%copy':>6}"
    header += f" {'vs eager':>9} {'vs compile':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        fmt = lambda v: f"{v:.2f}x" if v else "-"
        lines.append(
            f"{r['case']:<44} {r['direction']:<8} {r['provider']:<16} {r['median_ms']:>9.3f} {r['gbps']:>8.1f} "
            f"{100 * r['gbps'] / copy_gbps:>5.0f}% {fmt(r['vs_eager']):>9} {fmt(r['vs_compile']):>10}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    families = (add_norm, batch_norm)
    cases = [c for f in families for c in (f.full_cases(device) if args.full else f.quick_cases(device))]
    if args.ops:
        cases = [c for c in cases if c.op in args.ops]
    copy_gbps = copy_bandwidth_gbps(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(
        f"fusedres {fusedres.__version__} on {gpu or 'CPU'} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads); measured copy bandwidth {copy_gbps:.1f} GB/s"
    )

    rows, parity_rows = [], []
    for case in cases:
        fns = {
            name: harness.provider_fn(name, backend, case)
            for name, backend in harness.providers(device, args.backends).items()
        }
        for name, result in harness.parity(case, device, fns).items():
            parity_rows.append({"case": case.label, "provider": name, **result})
            status = {True: "ok", False: "FAIL", None: "(reference point)"}[result["pass"]]
            print(
                f"parity {case.label:<44} {name:<16} max|err| {result['max_abs_error']:.3g} "
                f"(eager {result['eager_max_abs_error']:.3g}) {status}"
            )
        rows += harness.time_case(case, device, fns, reps=args.reps)
        print(f"timed  {case.label}", flush=True)
    add_speedups(rows)
    table = format_table(rows, copy_gbps)
    print(table)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        env = {
            "device": gpu or "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "fusedres": fusedres.__version__,
            "threads": torch.get_num_threads(),
            "copy_gbps": copy_gbps,
            "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"environment": env, "parity": parity_rows, "timings": rows}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(f"# fusedres benchmark\n\n{env}\n\n```\n{table}\n```\n")
    failed = [p for p in parity_rows if p["pass"] is False]
    if failed:
        print(f"{len(failed)} parity failure(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
