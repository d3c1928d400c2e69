"""`python -m fusedres.bench` (also `fusedres-bench`): parity and speed of every fused op against
eager PyTorch, torch.compile and installed peer libraries, on CUDA when present, else CPU.

Exits 1 when a fusedres provider misses the parity rule or raises, so it doubles as a smoke test.

examples:
  python -m fusedres.bench --quick                      # ~2 minutes on a 2-core CPU
  python -m fusedres.bench --full --out bench/results --name auto
  python -m fusedres.bench --ops add_rms_norm --shapes prenorm --dtypes bfloat16 float16
  python -m fusedres.bench --providers eager fusedres --directions fwd+bwd
  python -m fusedres.bench --compare old/results.json new/results.json
  python -m fusedres.bench --overhead                   # host us per call, fused vs eager, tiny tensors
  python -m fusedres.bench --overhead --quick --out bench/results --name auto
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from fusedres.bench import compare, harness, overhead, registry, report
from fusedres.bench.environment import environment, results_stem
from fusedres.bench.providers import providers
from fusedres.bench.timing import copy_bandwidth_gbps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fusedres.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the default set: every op form, a few shapes")
    size.add_argument("--full", action="store_true", help="model shapes (BERT, GPT-2, Llama, ResNet-50): for GPUs")
    size.add_argument("--smoke", action="store_true", help="tiny shapes: seconds, for CI")
    pick = p.add_argument_group("filters")
    pick.add_argument("--ops", nargs="+", help="families (add_norm, batch_norm) or ops (add_layer_norm, ...)")
    pick.add_argument("--dtypes", nargs="+", help="run every case in these dtypes (float32, bfloat16, float16)")
    pick.add_argument("--shapes", nargs="+", help="keep cases whose label contains one of these (x4096, 56x56, /eval)")
    pick.add_argument("--backends", nargs="+", help="fusedres backends to run (default: every usable one)")
    pick.add_argument("--providers", nargs="+", help="eager, compile, fusedres[-<backend>], liger, flash-attn, apex")
    pick.add_argument("--directions", nargs="+", choices=harness.DIRECTIONS, default=list(harness.DIRECTIONS))
    pick.add_argument("--no-peers", action="store_true", help="leave peer libraries out even when installed")
    timing = p.add_argument_group("timing")
    timing.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    timing.add_argument("--reps", type=int, default=20, help="timed calls per provider and direction")
    timing.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    timing.add_argument("--max-seconds", type=float, default=1.0, help="stop timing one series after this long")
    timing.add_argument("--no-graphs", action="store_true", help="never time in CUDA graphs")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="write <name>.json, <name>.md and <name>-<group>.png here")
    out.add_argument(
        "--name",
        default="results",
        help="file stem for --out (default: results); 'auto' names files <device>-<date>, as bench/results/ wants",
    )
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    out.add_argument("--list", action="store_true", help="list the selected cases and providers, run nothing")
    cmp = p.add_argument_group("compare")
    cmp.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="regression table of two results.json")
    cmp.add_argument("--threshold", type=float, default=compare.DEFAULT_THRESHOLD, help="relative change flagged")
    cmp.add_argument("--fail-on-regression", action="store_true", help="exit 1 when --compare finds a regression")
    ovh = p.add_argument_group(
        "host overhead",
        "--overhead times the host side of one call (tiny tensors), fused vs the eager ops it replaces; it "
        "honours --ops, --backends, --device, --out, --name, --list and --quick/--full/--smoke (calls per block)",
    )
    ovh.add_argument("--overhead", action="store_true", help="host us, dispatched ops and kernels per call")
    ovh.add_argument(
        "--calls",
        type=int,
        help=f"calls per timed block (default: {overhead.CALLS['full']}; --quick {overhead.CALLS['quick']}, "
        f"--smoke {overhead.CALLS['smoke']})",
    )
    ovh.add_argument("--repeats", type=int, default=overhead.REPEATS, help="timed blocks per side; the best counts")
    args = p.parse_args(argv)
    if args.overhead:
        unused = [f"--{k}" for k in ("dtypes", "shapes", "providers", "compare") if getattr(args, k)]
        if unused:
            p.error(f"--overhead does not use {', '.join(unused)}")
        if (args.calls is not None and args.calls < 1) or args.repeats < 1:
            p.error("--calls and --repeats must be at least 1")
    return args


def _progress(items: list, enabled: bool):
    """(iterable, write): a tqdm bar on stderr when tqdm is installed, and a print that does not
    tear it."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        return items, lambda s: print(s, flush=True)
    return tqdm(items, desc="fusedres.bench", unit="case", file=sys.stderr, dynamic_ncols=True), tqdm.write


def _case_line(label: str, parity: dict, timed: int) -> str:
    judged = {name: p for name, p in parity.items() if p.get("judged")}
    if not parity:
        status = "no float64 reference"
    else:
        status = ", ".join(
            f"{name} {report.verdict(p)} ({report.fmt_err(p.get('max_abs_error'))} vs eager "
            f"{report.fmt_err(p.get('eager_max_abs_error'))})"
            for name, p in judged.items()
        )
    return f"{label}: parity {status or 'not judged (no fusedres provider)'}; {timed} timings"


def run_compare(args) -> int:
    text, regressions = compare.compare(
        report.read_json(args.compare[0]), report.read_json(args.compare[1]), args.threshold
    )
    print(text)
    return 1 if regressions and args.fail_on_regression else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        return run_compare(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.overhead:
        return run_overhead(args, device)
    case_set = "full" if args.full else "smoke" if args.smoke else "quick"
    cases = registry.select_cases(device, case_set, ops=args.ops, dtypes=args.dtypes, shapes=args.shapes)
    provs, peer_notes = providers(device, args.backends, args.providers, peers=not args.no_peers)
    if args.list:
        print("\n".join(f"{family:<12} {case.label}" for family, case in cases))
        print("providers:", ", ".join(p.name for p in provs), *peer_notes, sep="\n  ")
        return 0
    if not cases or not provs:
        print(f"nothing to run: {len(cases)} case(s), {len(provs)} provider(s) after the filters", file=sys.stderr)
        return 2

    copy_gbps = copy_bandwidth_gbps(device)
    env = environment(device, copy_gbps)
    print(
        f"fusedres {env['fusedres']} ({env['commit']}) on {env['device']}: torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env['cuda']}, {env['threads']} threads; "
        f"copy bandwidth {copy_gbps:.1f} GB/s"
    )
    print(f"{len(cases)} {case_set} case(s); providers: {', '.join(p.name for p in provs)}")

    options = harness.TimingOptions(
        directions=tuple(args.directions),
        warmup=args.warmup,
        reps=args.reps,
        max_seconds=args.max_seconds,
        cuda_graphs=not args.no_graphs,
    )
    parity_rows, rows, notes, failures = _run(cases, provs, device, options, not args.no_progress)
    harness.add_derived(rows, copy_gbps)
    notes = [*peer_notes, *notes]
    _print_tables(parity_rows, rows, notes, device.type)
    if args.out:
        _write_outputs(args, env, parity_rows, rows, notes, copy_gbps)
    if failures:
        print(f"{len(failures)} fusedres failure(s):", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


def _run(cases: list, provs: list, device, options, progress: bool):
    """Every case through the harness: (parity rows, timing rows, notes, fusedres failures)."""
    parity_rows, rows, notes, failures = [], [], [], []
    bar, write = _progress(cases, progress)
    for family, case in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(case.label)
        result = harness.run_case(case, device, provs, options, family)
        parity_rows += [{"case": case.label, "provider": name, **p} for name, p in result.parity.items()]
        rows += result.rows
        failures += result.failures
        notes += [n for n in result.notes if n not in notes]  # a peer's skip reason, once
        write(_case_line(case.label, result.parity, len(result.rows)))
    return parity_rows, rows, notes, failures


def _print_tables(parity_rows: list, rows: list, notes: list, device_type: str) -> None:
    print()
    if parity_rows:
        print(report.parity_table(parity_rows), end="\n\n")
    if rows:
        print(report.timing_table(rows, device_type), end="\n\n")
        print(report.summary_table(rows), end="\n\n")
    for n in notes:
        print(f"note: {n}")


def _write_outputs(args, env, parity_rows, rows, notes, copy_gbps) -> None:
    os.makedirs(args.out, exist_ok=True)
    stem = results_stem(env["device"]) if args.name == "auto" else args.name
    written = []
    if not args.no_plots and rows:
        from fusedres.bench import plots

        missing = plots.matplotlib_missing()
        if missing:
            print(f"note: {missing}")
            notes = [*notes, missing]
        else:
            written = plots.plots(rows, args.out, stem, env["device"], copy_gbps)
    results = report.results_dict(env, vars(args), parity_rows, rows, notes, written)
    report.write_json(os.path.join(args.out, f"{stem}.json"), results)
    report.write_markdown(os.path.join(args.out, f"{stem}.md"), results)
    print(f"wrote {stem}.json, {stem}.md and {len(written)} plot(s) to {args.out}")


def run_overhead(args, device: torch.device) -> int:
    """--overhead: host time, dispatched ops and kernel launches per call (overhead.py). Exits 1
    when a fusedres side raises or disagrees with eager; a missed target is a finding, not a failure."""
    cases = overhead.select_cases(args.ops)
    backends = overhead.overhead_backends(device, args.backends)
    if args.list:
        print("\n".join(f"{c.family:<12} {c.label} {'x'.join(map(str, c.shape))}" for c in cases))
        print("backends:", ", ".join(backends))
        return 0
    if not cases or not backends:
        print(f"nothing to run: {len(cases)} case(s), {len(backends)} backend(s) after the filters", file=sys.stderr)
        return 2
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    options = overhead.OverheadOptions(
        calls=args.calls or overhead.CALLS[size], repeats=args.repeats, backends=args.backends
    )
    with overhead.one_thread(device):
        env = environment(device, None)
        del env["copy_gbps"]  # not measured: host time is the subject
        print(
            f"fusedres {env['fusedres']} ({env['commit']}) host overhead on {env['device']}: torch {env['torch']}, "
            f"{env['threads']} thread(s); best of {options.repeats} x {options.calls} calls; "
            f"backends: {', '.join(backends)}",
            flush=True,
        )
        result = overhead.run(device, cases, options, progress=lambda s: print(s, flush=True))
    print()
    if result.rows:
        print(overhead.table(result.rows, device.type))
        print()
        print(overhead.LEGEND.format(calls=options.calls, repeats=options.repeats))
    for n in result.notes:
        print(f"note: {n}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = (results_stem(env["device"]) if args.name == "auto" else args.name) + "-overhead"
        results = overhead.results_dict(env, vars(args), result, options)
        report.write_json(os.path.join(args.out, f"{stem}.json"), results)
        with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
            f.write(overhead.markdown(results))
        print(f"wrote {stem}.json and {stem}.md to {args.out}")
    if result.failures:
        print(f"{len(result.failures)} fusedres failure(s):", *result.failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0
