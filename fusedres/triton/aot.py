"""Ahead-of-time compile of every Triton kernel specialization the launchers choose, without a GPU.

    python -m fusedres.triton.aot [--arch 80,90] [--full|--quick|--smoke] [--ops OP ...]
                                  [--dtypes DTYPE ...] [--shapes SUBSTRING ...] [--jobs N]
                                  [--json FILE] [--list]

What is compiled: the benchmark's cases (fusedres/bench; by default its GPU ``--full`` set, in
float32, bfloat16, float16 and float64; --quick/--smoke/--ops/--dtypes/--shapes select cases as
the bench's own flags do), each at its timing shape and at the parity check's small shape, as
the bench runs them. For each case the launchers of fusedres/triton are called as fusedres/ops
calls them for ``case.fused()``: the forward with grad then the backward (every input needing
grad, as in the bench), and the forward under ``torch.no_grad()``; BatchNorm training also as
SyncBatchNorm (8 processes), BatchNorm eval also folded into its conv (``bias_add_relu``). They
run on meta tensors, with a ``launch`` that records each kernel launch instead of running it and
with the SM count of the target (108 for an A100, sm_80; 132 for an H100 / H200, sm_90), so every
launch configuration comes from the launchers' own config functions.

Each recorded launch is bound to its specialization as Triton's JIT binds a launch: the pointer
dtypes, which optional pointers are None, integer arguments equal to 1 (constants) or divisible
by 16, the constexprs and num_warps (meta tensors have data_ptr() 0, so every pointer counts as
16-byte aligned, as fresh CUDA allocations are). The distinct specializations are compiled once
per arch with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in a process
pool: no GPU and no CUDA driver are needed. Printed per specialization: registers, spilled bytes
and the shared memory the launch asks for (``metadata.shared``). Triton reads registers and
spills (``n_regs``, ``n_spills``) from the driver when it loads a kernel, which needs a GPU; here
they come from the cubin, through Triton's cuobjdump: registers, and the stack frame (where ptxas
spills) plus local memory.

Exit status: 0, or 1 when any specialization fails to compile (MLIR's or ptxas's error is
reported) or spills, unless the spill is listed in KNOWN_SPILLS with its reason; 2 for bad
arguments. --list enumerates without compiling. --json FILE writes every specialization
(signature, constexprs, attributes, the cases that launch it) and its result.

On a GPU machine this is a pre-check before the GPU tests that takes no GPU time:
``python -m fusedres.triton.aot --arch 90`` compiles with the Triton installed there. Compiles
are kept in Triton's cache (TRITON_CACHE_DIR), so a second run takes seconds. TRITON_INTERPRET
must be unset (under the interpreter the launchers choose its tiny configurations): when it is
set, the command runs itself again without it.

Triton internals used, the same in Triton 3.6 and 3.8 (no version switch needed):
``triton.runtime.jit.create_function_from_signature`` and ``JITFunction._pack_args`` (how a
launch is bound to its specialization), ``triton.compiler.compiler.make_backend``,
``triton.knobs.nvidia.cuobjdump``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from fusedres.bench.registry import SETS, select_cases
from fusedres.ops.batch_norm import OP_NAMES as BN_OP_NAMES
from fusedres.triton import add_norm as _add_norm
from fusedres.triton import batch_norm as _batch_norm

# SMs of the GPU each arch is planned for (the SM count sets the add-norm backward's grid, whose
# rows per program Triton specializes on, and the BatchNorm reductions' split).
SM_COUNTS = {80: 108, 90: 132}  # A100; H100 / H200
DTYPES = ("float32", "bfloat16", "float16", "float64")
SYNC_WORLD_SIZE = 8

# Specializations allowed to spill: (kernel name, "NAME=value ..." constexprs it must have) ->
# why the spill is accepted. Empty: any spill fails the run. (The float64 add-norm backward used
# to spill at BLOCK_N = 8192 on sm_90; its single-block limit is 4096 since.)
KNOWN_SPILLS: dict[tuple[str, str], str] = {}

# The launchers by name (the Triton launchers have the names of fusedres/ops's kernels).
_LAUNCHERS = {name: getattr(_add_norm, name) for name in ("add_norm_fwd", "add_norm_bwd")}
_LAUNCHERS.update((name, getattr(_batch_norm, name)) for name in BN_OP_NAMES)
_USES_SM_COUNT = {"add_norm_bwd", "batch_norm_stats", "batch_norm_add_relu_bwd_reduce"}


# ----------------------------------------------------------------------------------------------
# The launcher calls of a benchmark case
# ----------------------------------------------------------------------------------------------

# Each function calls `call(launcher_name, *args)` as fusedres/ops calls the launchers for
# case.fused() on `inputs` (the case's make_inputs), with grad (every input a leaf that needs
# grad; the backward gets a grad for every output) or without. tests/test_triton_aot.py checks
# that the calls are the ones fusedres/ops makes.


def add_norm_calls(call, case, inputs, grad: bool) -> None:
    """fusedres/ops/add_norm.py: plan, _run, _save, _backward_with (a GPU backend: h is stored
    for the backward rather than recomputed)."""
    from fusedres.ops.add_norm import BwdArgs, FwdArgs, plan

    x, residual, weight, bias = inputs
    p = plan(x, residual, case.residual_in_fp32, case.prenorm, grad, False, False, False)
    fwd = FwdArgs(x, residual, weight, bias, case.eps, case.rms_norm, p.h_dtype, p.store_h)
    y, h, mean, rstd, _mask = call("add_norm_fwd", *fwd)
    if not grad:
        return
    dh = torch.empty_like(h) if case.prenorm else None
    call(
        "add_norm_bwd",
        *BwdArgs(
            torch.empty_like(y),
            dh,
            h if p.saves_h else None,
            x if p.saves_x else None,
            None if p.saves_h else residual,
            p.h_dtype,
            weight,
            bias,
            None if case.rms_norm else mean,
            rstd,
            case.rms_norm,
            p.dresidual_dtype,
        ),
    )


def batch_norm_calls(call, case, inputs, grad: bool, sync: bool = False, folded: bool = False) -> None:
    """fusedres/ops/batch_norm.py: _run, _forward (_sync_stats with sync), _backward_with; with
    folded, bias_add_relu (eval with BN folded into the conv: bias + add + ReLU)."""
    x, residual, weight, bias = inputs
    c, eps, momentum = x.shape[1], 1e-5, 0.1
    if folded:
        call("batch_norm_add_relu_fwd", x, residual, None, bias, None, None, 1.0, True, False, 1)
        return
    # The bench's running stats have the weight's dtype (BNCase._with_running_stats).
    running_mean, running_var = torch.empty_like(weight), torch.empty_like(weight)
    if not case.training:
        mean, var, count = running_mean, running_var, 1
    elif sync:
        mean, var = call("batch_norm_stats", x, None, None, 0.0)
        gathered = torch.empty((SYNC_WORLD_SIZE, 2 * c + 1), dtype=mean.dtype, device=x.device)
        mean, var = call("batch_norm_combine_stats", gathered, running_mean, running_var, momentum)
        count = SYNC_WORLD_SIZE * (x.numel() // c)
    else:
        mean, var = call("batch_norm_stats", x, running_mean, running_var, momentum)
        count = x.numel() // c
    out = call("batch_norm_add_relu_fwd", x, residual, weight, bias, mean, var, eps, True, case.training, count)
    if not grad:
        return
    # Every input needs grad, and relu: the reduce pass writes the residual's (masked) grad, which
    # the input pass reads instead of grad_out and out.
    sum_dy, sum_dy_xhat, g = call(
        "batch_norm_add_relu_bwd_reduce", torch.empty_like(out), out, x, mean, var, eps, True, True
    )
    call(
        "batch_norm_add_relu_bwd_input",
        g,
        None,
        x,
        mean,
        var,
        eps,
        weight,
        sum_dy,
        sum_dy_xhat,
        count,
        case.training,
        True,
    )


def case_variants(family: str, case) -> list[tuple[str, object]]:
    """(variant name, fn(call, inputs)) for each way the case's launchers are called."""
    if family == "add_norm":
        return [
            ("grad", functools.partial(add_norm_calls, case=case, grad=True)),
            ("no_grad", functools.partial(add_norm_calls, case=case, grad=False)),
        ]
    variants = [
        ("grad", functools.partial(batch_norm_calls, case=case, grad=True)),
        ("no_grad", functools.partial(batch_norm_calls, case=case, grad=False)),
    ]
    if case.training:
        variants.append(("sync", functools.partial(batch_norm_calls, case=case, grad=True, sync=True)))
    else:
        variants.append(("folded", functools.partial(batch_norm_calls, case=case, grad=False, folded=True)))
    return variants


class _Recorder:
    """Calls the launchers with a `launch` that records each launch, `launch(kernel)[grid](*args,
    **kwargs)`, as (kernel, args, kwargs) instead of running it, and with sm_count SMs."""

    def __init__(self, sm_count: int):
        self.sm_count = sm_count
        self.launches: list[tuple] = []

    def __call__(self, name: str, *args):
        kwargs = {"sm_count": self.sm_count} if name in _USES_SM_COUNT else {}
        return _LAUNCHERS[name](*args, launch=self._launch, **kwargs)

    def _launch(self, kernel):
        return _Recording(self.launches, kernel)


class _Recording:
    """kernel[grid](*args, **kwargs) appends (kernel, args, kwargs) to launches."""

    def __init__(self, launches: list, kernel):
        self.launches, self.kernel = launches, kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def case_launches(family: str, case, sm_count: int) -> list[tuple[str, list[tuple]]]:
    """(where, launches) for each shape and variant of a case: where is "label [parity] variant"."""
    out = []
    with torch.device("meta"):  # make_inputs's tensors, and everything the launchers allocate
        for small in (False, True):
            inputs = case.make_inputs("meta", small=small)
            for variant, calls in case_variants(family, case):
                recorder = _Recorder(sm_count)
                calls(recorder, inputs=inputs)
                out.append((f"{case.label}{' parity' if small else ''} {variant}", recorder.launches))
    return out


# ----------------------------------------------------------------------------------------------
# Specializations
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """One kernel specialization for one arch: what Triton compiles for a launch."""

    kernel: str  # "module:name" of the @triton.jit function
    arch: int
    num_warps: int
    signature: tuple  # ((param, Triton type), ...); "constexpr" for constexprs, None pointers, ints == 1
    constexprs: tuple  # ((param, value), ...)
    attrs: tuple  # ((param, (("tt.divisibility", 16),)), ...): pointers and ints divisible by 16
    options: tuple  # the launch's compile options (num_warps), sorted (name, value) pairs
    not_div16: tuple = ()  # int params Triton specializes that are not divisible by 16 (none == 1)

    @property
    def name(self) -> str:
        return self.kernel.rpartition(":")[2]

    def config(self) -> str:
        """The constexprs that are not None pointers, as NAME=value (bools as 0 / 1)."""
        return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs if v is not None)

    def describe(self) -> str:
        """config | the first pointer's dtype (and the pointers of other dtypes) | None pointers |
        specialized ints not divisible by 16."""
        ptrs = [(k, t[1:]) for k, t in self.signature if t.startswith("*")]
        others = ",".join(f"{k}:{t}" for k, t in ptrs if t != ptrs[0][1])
        nones = [k for k, v in self.constexprs if v is None]
        parts = [self.config(), ptrs[0][1] + (f" ({others})" if others else "")]
        if nones:
            parts.append("None: " + ",".join(nones))
        if self.not_div16:
            parts.append("%16!=0: " + ",".join(self.not_div16))
        return " | ".join(parts)


@functools.cache
def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


@functools.cache
def _binder(kernel, arch: int):
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(kernel.signature, kernel.params, _backend(arch))


def specialize(kernel, args: tuple, kwargs: dict, arch: int) -> Spec:
    """The Spec of launching kernel(*args, **kwargs) on an sm_<arch> GPU, bound as
    JITFunction.run binds it."""
    backend = _backend(arch)
    bound, specialization, options = _binder(kernel, arch)(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    names = kernel.arg_names
    aligned = {names[path[0]] for path, a in attrs.items() if a}
    specialized_ints = [p.name for p in kernel.params if not p.do_not_specialize and signature[p.name][0] in "iu"]
    return Spec(
        kernel=f"{kernel.__module__}:{kernel.__name__}",
        arch=arch,
        num_warps=options.num_warps,
        signature=tuple(signature.items()),
        constexprs=tuple((names[path[0]], value) for path, value in constexprs.items()),
        attrs=tuple((names[path[0]], tuple(map(tuple, a))) for path, a in attrs.items() if a),
        options=tuple(sorted((k, v) for k, v in kwargs.items() if k not in names)),
        not_div16=tuple(n for n in specialized_ints if n not in aligned),
    )


def plan(cases: list[tuple[str, object]], archs: list[int]) -> dict[Spec, list[str]]:
    """Every distinct Spec the cases launch on each arch, with where it is launched."""
    if _add_norm._INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET is set: the launchers would choose the interpreter's configurations")
    specs: dict[Spec, list[str]] = {}
    for arch in archs:
        for family, case in cases:
            for where, launches in case_launches(family, case, SM_COUNTS[arch]):
                for kernel, args, kwargs in launches:
                    specs.setdefault(specialize(kernel, args, kwargs, arch), []).append(where)
    return specs


# ----------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    spec: Spec
    regs: int | None = None
    spill_bytes: int | None = None  # stack frame + local memory per thread
    shared: int | None = None  # bytes of shared memory the launch asks for
    seconds: float = 0.0
    error: str | None = None


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack frame + local bytes) of the cubin's kernel, from cuobjdump. (Triton reads
    both from the driver when it loads a kernel, which needs a GPU.)"""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True, text=True
        )
    found = _USAGE.search(done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"cuobjdump --dump-resource-usage failed: {done.stderr.strip() or done.stdout.strip()}")
    regs, stack, local = map(int, found.groups())
    return regs, stack + local


def compile_spec(spec: Spec) -> Result:
    """Compiles one Spec for its arch (in a worker process) and reads its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    module, _, name = spec.kernel.partition(":")
    fn = getattr(importlib.import_module(module), name)
    attrs = {(fn.arg_names.index(k),): [list(a) for a in v] for k, v in spec.attrs}
    src = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), attrs)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        try:
            with _output_to(log):  # MLIR's diagnostics and reproducers, and on a ptxas failure the PTX
                compiled = triton.compile(src, target=GPUTarget("cuda", spec.arch, 32), options=dict(spec.options))
            regs, spill = _resource_usage(compiled.asm["cubin"])
        except Exception as e:
            log.seek(0)
            errors = dict.fromkeys(line.strip() for line in log if " error: " in line)  # MLIR's, in order
            message = "; ".join([f"{type(e).__name__}: {str(e).strip()}"[:1000], *list(errors)[:3]])
            return Result(spec, seconds=time.perf_counter() - start, error=message)
    return Result(spec, regs, spill, compiled.metadata.shared, time.perf_counter() - start)


@contextlib.contextmanager
def _output_to(file):
    """Sends this process's stdout and stderr to `file` meanwhile, at the file descriptors: Triton's
    C++ passes write their diagnostics there, past sys.stdout / sys.stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(file.fileno(), 1)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def compile_all(specs, jobs: int, progress: bool = True) -> list[Result]:
    """compile_spec over specs, in `jobs` worker processes (inline with jobs <= 1)."""
    specs, out = list(specs), []
    with contextlib.ExitStack() as stack:
        if jobs <= 1:
            results = map(compile_spec, specs)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: workers import triton afresh (no LLVM state or threads inherited through fork)
            pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
            results = stack.enter_context(pool).map(compile_spec, specs)
        tick = stack.enter_context(_progress(len(specs) if progress else 0))
        for result in results:
            out.append(result)
            tick()
    return out


@contextlib.contextmanager
def _progress(total: int):
    """tick() after each compile: a tqdm bar on stderr when tqdm is installed, else a line per 10%."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if total and tqdm is not None:
        with tqdm(total=total, desc="compiling", unit="kernel", file=sys.stderr) as bar:
            yield lambda: bar.update()
        return
    done = [0]

    def tick():
        done[0] += 1
        if total and (done[0] * 10 // total != (done[0] - 1) * 10 // total or done[0] == total):
            print(f"compiled {done[0]}/{total}", file=sys.stderr, flush=True)

    yield tick


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def known_spill(spec: Spec, known: dict) -> str | None:
    """The reason KNOWN_SPILLS (or `known`) gives for spec's spill, or None."""
    config = set(spec.config().split())
    for (name, constexprs), reason in known.items():
        if name == spec.name and set(constexprs.split()) <= config:
            return reason
    return None


def problems(results: list[Result], known: dict = KNOWN_SPILLS) -> tuple[list[str], list[str]]:
    """(failures, accepted): compile failures and spills not in `known`; spills it accepts."""
    failures, accepted = [], []
    for r in results:
        what = f"sm_{r.spec.arch} {r.spec.name} {r.spec.describe()}"
        if r.error is not None:
            failures.append(f"compile failed: {what}: {r.error}")
        elif r.spill_bytes:
            reason = known_spill(r.spec, known)
            if reason is None:
                failures.append(f"spills {r.spill_bytes} bytes: {what}")
            else:
                accepted.append(f"spills {r.spill_bytes} bytes (accepted: {reason}): {what}")
    return failures, accepted


def table(results: list[Result]) -> str:
    rows = [("arch", "kernel", "warps", "regs", "spill B", "shared B", "s", "specialization")]
    for r in sorted(results, key=lambda r: (r.spec.name, r.spec.arch, r.spec.describe())):
        missing = "FAIL" if r.error else "-"
        rows.append(
            (
                f"sm_{r.spec.arch}",
                r.spec.name,
                str(r.spec.num_warps),
                missing if r.regs is None else str(r.regs),
                missing if r.spill_bytes is None else str(r.spill_bytes),
                missing if r.shared is None else str(r.shared),
                f"{r.seconds:.1f}",
                r.spec.describe(),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def summary(results: list[Result]) -> str:
    """Max registers and spills per kernel and arch."""
    worst: dict[tuple[str, int], list[int]] = {}
    for r in results:
        if r.error is None:
            w = worst.setdefault((r.spec.name, r.spec.arch), [0, 0, 0])
            w[0], w[1], w[2] = w[0] + 1, max(w[1], r.regs), max(w[2], r.spill_bytes)
    lines = [
        f"  {name:32s} sm_{arch}: {n:3d} specializations, max {regs:3d} registers, max spill {spill} B"
        for (name, arch), (n, regs, spill) in sorted(worst.items())
    ]
    return "\n".join(lines)


def report(results: list[Result], known: dict = KNOWN_SPILLS, out=None) -> int:
    """Prints the table, the per-kernel summary and every problem (to `out`, default stdout); the
    exit status: 1 when any specialization failed to compile or spills outside `known`, else 0."""
    out = out or sys.stdout
    failures, accepted = problems(results, known)
    print(table(results), file=out)
    print(summary(results), file=out)
    for line in accepted + failures:
        print(line, file=out)
    ok = len(results) - sum(r.error is not None for r in results)
    print(f"{ok}/{len(results)} specializations compiled; {len(failures)} failures", file=out)
    return 1 if failures else 0


def to_json(specs: dict[Spec, list[str]], results: list[Result] | None) -> list[dict]:
    by_spec = {r.spec: r for r in results or []}
    rows = []
    for spec, where in specs.items():
        row = dataclasses.asdict(spec)
        row.update(name=spec.name, config=spec.config(), describe=spec.describe(), cases=where)
        r = by_spec.get(spec)
        if r is not None:
            row.update(regs=r.regs, spill_bytes=r.spill_bytes, shared=r.shared, seconds=r.seconds, error=r.error)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _archs(text: str) -> list[int]:
    archs = [int(a) for a in text.replace(" ", "").split(",") if a]
    unknown = [a for a in archs if a not in SM_COUNTS]
    if unknown or not archs:
        raise argparse.ArgumentTypeError(f"archs must be among {sorted(SM_COUNTS)}, got {text!r}")
    return archs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fusedres.triton.aot",
        description="Compile every Triton specialization the launchers choose for the bench's cases, without a GPU.",
    )
    p.add_argument("--arch", type=_archs, default=[80, 90], help="comma-separated: 80 (A100), 90 (H100/H200)")
    size = p.add_mutually_exclusive_group()
    for name in SETS:
        size.add_argument(f"--{name}", dest="set", action="store_const", const=name, help=f"the bench's --{name} cases")
    p.set_defaults(set="full")
    p.add_argument("--ops", nargs="+", help="families (add_norm, batch_norm) or ops, as the bench's --ops")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), help=f"default: {' '.join(DTYPES)}")
    p.add_argument("--shapes", nargs="+", help="keep cases whose label contains one of these, as the bench's --shapes")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--json", metavar="FILE", help="write every specialization and its result")
    p.add_argument("--list", action="store_true", help="enumerate the specializations, compile nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """The command line (argv: sys.argv[1:] by default); returns the exit status."""
    args = parse_args(argv)
    if _add_norm._INTERPRETED and argv is None:  # kernels defined for the interpreter: run afresh without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    start = time.perf_counter()
    cases = select_cases(torch.device("cuda"), args.set, ops=args.ops, dtypes=args.dtypes, shapes=args.shapes)
    specs = plan(cases, args.arch)
    kernels = len({s.kernel for s in specs})
    print(
        f"{len(specs)} specializations of {kernels} kernels for sm_{', sm_'.join(map(str, args.arch))} "
        f"from {len(cases)} cases ({time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    if not specs:
        print("no case selected: see --ops, --dtypes, --shapes", file=sys.stderr)
        return 1
    results = None if args.list else compile_all(specs, args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(specs, results), f, indent=1, default=str)
    if results is None:
        for spec in sorted(specs, key=lambda s: (s.name, s.arch, s.describe())):
            print(f"sm_{spec.arch}  {spec.name}  warps={spec.num_warps}  {spec.describe()}")
        return 0
    status = report(results)
    print(f"total {time.perf_counter() - start:.1f} s with {args.jobs} jobs")
    return status


if __name__ == "__main__":
    sys.exit(main())
