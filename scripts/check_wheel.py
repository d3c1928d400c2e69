#!/usr/bin/env python3
"""Checks a built fusedres wheel (and optionally its sdist) before anyone installs it.

    python scripts/check_wheel.py dist/fusedres-*.whl [--sdist dist/fusedres-*.tar.gz]
                                  [--require-cuda] [--archs "8.0;9.0+PTX"]

Wheel: named and tagged cp310-abi3 (one wheel for every CPython >= 3.10), not pure; nothing
but fusedres/ and its .dist-info; the extension fusedres/_C.abi3.so, and fusedres/_fastpath (the
eager fast path, built for one CPython and torch) exactly when the build info says it was built,
for the CPython it names, linking neither libpython nor libtorch_python; fusedres/_build_info.py
present and consistent with the metadata. _C: no undefined c10::/at::/torch:: (C++, unstable ABI)
symbols, only torch's stable C shim (aoti_torch_*, torch_*); no libtorch_python or libpython
dependency; Python symbols from the limited API. CUDA (when the build info says so, or
--require-cuda): `cuobjdump --list-elf` shows code for every arch in --archs and `--list-ptx` PTX
for those marked +PTX; _C needs the libcudart of the CUDA major it was built for. sdist: carries
csrc/, setup.py, build_config.py, pyproject.toml, MANIFEST.in, COMMIT, and no build outputs.

CUDA kernels' resources, per kernel and cubin arch (a table of them is printed): no kernel may
use local memory, and none may have more registers than its launch bounds allow.
- Registers and launch bounds: `cuobjdump --dump-resource-usage` gives each kernel's REG, STACK,
  LOCAL and SHARED; `--dump-elf` its EIATTR_MAX_THREADS (x y z), which ptxas writes for kernels
  declared __launch_bounds__(T) (the ELF attribute, not the kernel's name: names and template
  arguments change, the attribute is what the driver enforces). One block of T threads must fit
  the 65536-register file: registers are allocated 8 per thread (256 per warp), so the cap is
  65536 / (T rounded up to a warp) rounded down to 8, at most 255 (512 -> 128, 1024 -> 64).
  A kernel without launch bounds has no EIATTR_MAX_THREADS: only the 255 limit is checked, and it
  is listed, since its launcher alone decides whether a block fits.
- Spills: cuobjdump prints no spill figures (ptxas -v does, at compile time only), so the
  binary's own evidence stands in for them: a non-zero STACK (the per-thread stack frame, which
  holds spilled registers, and also local arrays and registers saved around real calls) or LOCAL,
  and the local-memory stores and loads (STL/LDL) in the kernel's SASS (`--dump-sass`). A local
  array or a frame for a call fails as well: it costs the same memory traffic as a spill.

Needs binutils (nm, readelf, c++filt); cuobjdump from $CUOBJDUMP, $CUDA_HOME/bin, PATH, or the
copy Triton ships. Exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# setup.py's default arch list (build_config.py, stdlib only, by path: scripts/ is not a package).
_spec = importlib.util.spec_from_file_location("build_config", ROOT / "build_config.py")
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)
DEFAULT_ARCHS = build_config.DEFAULT_ARCH_LIST
# Namespaces of torch's C++ API: their symbols are not part of the stable ABI.
UNSTABLE_CXX = re.compile(r"(?<![\w:])(c10|at|torch|caffe2)::")
# Private CPython symbols that Python's limited API itself uses (Py_DECREF and friends).
LIMITED_API_PRIVATE = {"_Py_Dealloc", "_Py_DecRef", "_Py_IncRef", "_Py_NoneStruct", "_Py_TrueStruct", "_Py_FalseStruct"}
WHEEL_NAME = re.compile(
    r"^(?P<name>fusedres)-(?P<version>[^-]+)(-(?P<build>\d[^-]*))?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)


class Checker:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail else ""))
        if not ok:
            self.failures.append(what)
        return ok


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def parse_archs(arch_list: str) -> tuple[set[str], set[str]]:
    """ "8.0;9.0+PTX" -> ({"80", "90"}, {"90"}): archs that need code, archs that need PTX."""
    code, ptx = set(), set()
    for item in re.split(r"[;\s,]+", arch_list.strip()):
        if not item:
            continue
        arch = item.removesuffix("+PTX").replace(".", "")
        code.add(arch)
        if item.endswith("+PTX"):
            ptx.add(arch)
    return code, ptx


def find_cuobjdump() -> str | None:
    candidates = [os.environ.get("CUOBJDUMP")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    candidates += ["/usr/local/cuda/bin/cuobjdump", shutil.which("cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:  # Triton ships cuobjdump for its own use
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


# --- the CUDA kernels' resources ---------------------------------------------------------------
# sm_80 and sm_90 alike: 65536 32-bit registers per SM (a block may use them all), at most 255 per
# thread, allocated per warp in units of 256, i.e. 8 per thread.
REGISTER_FILE = 65536
MAX_REGS_PER_THREAD = 255
REG_ALLOC_UNIT = 8
# A local-memory load or store in SASS: `/*02c0*/  STL [R1], R0 ;`, `/*0330*/  @!P0 LDL.64 R2, [R1+0x8] ;`.
LOCAL_MEMORY_OP = re.compile(r"\*/\s+(?:@!?\w+\s+)?(LDL|STL)\b")


def register_budget(threads: int) -> int:
    """The most registers per thread with which one block of `threads` threads fits the register
    file, which is what nvcc caps a kernel declared __launch_bounds__(threads) at: 512 -> 128,
    768 -> 80, 1024 -> 64, 256 or fewer -> 255."""
    warps = -(-threads // 32)
    fits = REGISTER_FILE // (warps * 32) // REG_ALLOC_UNIT * REG_ALLOC_UNIT
    return min(MAX_REGS_PER_THREAD, fits)


@dataclass
class KernelResources:
    """One kernel in one arch's cubin, as cuobjdump reports it."""

    arch: str  # "sm_80"
    name: str  # mangled
    regs: int
    stack: int  # bytes per thread of stack frame: where spilled registers (and local arrays) go
    local: int  # bytes per thread of local memory outside the stack frame
    shared: int  # bytes of static shared memory per block
    max_threads: int | None = None  # block size __launch_bounds__ allows (EIATTR_MAX_THREADS); None: no bound
    local_loads: int | None = None  # LDL instructions in its SASS (None: SASS not read)
    local_stores: int | None = None  # STL instructions

    @property
    def reg_budget(self) -> int:
        return register_budget(self.max_threads) if self.max_threads else MAX_REGS_PER_THREAD

    @property
    def uses_local_memory(self) -> bool:
        return bool(self.stack or self.local or self.local_loads or self.local_stores)

    def problems(self) -> list[str]:
        found = []
        if self.uses_local_memory:
            sass = f", {self.local_stores} STL / {self.local_loads} LDL" if self.local_stores is not None else ""
            found.append(f"local memory (spills): STACK {self.stack} B, LOCAL {self.local} B{sass}")
        if self.regs > self.reg_budget:
            found.append(
                f"{self.regs} registers > {self.reg_budget}, the most a block of {self.max_threads} threads"
                f" (its launch bound) can have in the {REGISTER_FILE}-register file"
            )
        return found


def _cubin_lines(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(arch, line) for the lines of a cuobjdump dump that describe cubins (ELF), not PTX."""
    arch, in_elf = None, False
    for line in lines:
        if line.startswith("Fatbin "):
            in_elf, arch = line.startswith("Fatbin elf code"), None
        elif line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif in_elf and arch:
            yield arch, line


def parse_resource_usage(lines: Iterable[str]) -> dict[tuple[str, str], dict[str, int]]:
    """`cuobjdump --dump-resource-usage`: {(arch, kernel): {"REG": 64, "STACK": 0, "SHARED": 256, ...}}.
    It prints no spill figures (ptxas -v does, at compile time only)."""
    usage, function = {}, None
    for arch, line in _cubin_lines(lines):
        if m := re.match(r"\s*Function (\S+):\s*$", line):
            function = m[1]
        elif function:
            usage[(arch, function)] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            function = None
    return usage


def parse_max_threads(lines: Iterable[str]) -> dict[tuple[str, str], int]:
    """`cuobjdump --dump-elf`: {(arch, kernel): threads per block} from each kernel's .nv.info section,
    whose EIATTR_MAX_THREADS (x y z) ptxas writes for __launch_bounds__ kernels only."""
    bounds, function, attribute = {}, None, None
    for arch, line in _cubin_lines(lines):
        if line.startswith("."):  # a section header
            function = line.strip().removeprefix(".nv.info.") if line.startswith(".nv.info.") else None
            attribute = None
        elif function is None:
            continue
        elif m := re.match(r"\s*Attribute:\s*(\w+)", line):
            attribute = m[1]
        elif attribute == "EIATTR_MAX_THREADS" and (m := re.match(r"\s*Value:\s*(.*)", line)):
            x, y, z = (int(v, 16) for v in m[1].split()[:3])
            bounds[(arch, function)] = x * y * z
            attribute = None
    return bounds


def parse_local_memory_ops(lines: Iterable[str]) -> dict[tuple[str, str], tuple[int, int]]:
    """`cuobjdump --dump-sass`: {(arch, kernel): (LDL count, STL count)}."""
    counts: dict[tuple[str, str], list[int]] = {}
    key = None
    for arch, line in _cubin_lines(lines):
        if m := re.match(r"\s*Function : (\S+)", line):
            key = (arch, m[1])
            counts[key] = [0, 0]
        elif key and (m := LOCAL_MEMORY_OP.search(line)):
            counts[key][m[1] == "STL"] += 1
    return {key: (loads, stores) for key, (loads, stores) in counts.items()}


def kernel_resources(
    usage: Iterable[str], elf: Iterable[str], sass: Iterable[str] | None = None
) -> list[KernelResources]:
    """Every kernel of every cubin, from the three cuobjdump dumps (lines of each)."""
    bounds = parse_max_threads(elf)
    local_ops = parse_local_memory_ops(sass) if sass is not None else {}
    kernels = []
    for (arch, name), u in parse_resource_usage(usage).items():
        loads, stores = local_ops.get((arch, name), (None, None)) if sass is not None else (None, None)
        kernels.append(
            KernelResources(
                arch=arch,
                name=name,
                regs=u.get("REG", 0),
                stack=u.get("STACK", 0),
                local=u.get("LOCAL", 0),
                shared=u.get("SHARED", 0),
                max_threads=bounds.get((arch, name)),
                local_loads=loads,
                local_stores=stores,
            )
        )
    return kernels


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return names
    demangled = out.stdout.splitlines()
    return demangled if len(demangled) == len(names) else names


def short_kernel_name(demangled: str) -> str:
    """`void fusedres::(anonymous namespace)::add_norm_fwd_rows_kernel<1, __nv_bfloat16, float>(
    fusedres::(anonymous namespace)::FwdArgs<...>)` -> `add_norm_fwd_rows_kernel<1, bf16, float>`."""
    name = re.sub(r"\(anonymous namespace\)::|\bfusedres::(cuda::)?", "", demangled.removeprefix("void "))
    depth = 0
    for i, ch in enumerate(name):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "half")
    return re.sub(r">\s+(?=>)", ">", name)


def resource_table(kernels: list[KernelResources], names: dict[str, str]) -> str:
    """One row per kernel and arch; `names` maps mangled names to the ones to show."""
    header = ("kernel", "arch", "regs", "reg cap", "threads", "stack", "local", "STL/LDL", "shared", "")
    rows = [header]
    for k in sorted(kernels, key=lambda k: (names[k.name], k.arch)):
        rows.append(
            (
                names[k.name],
                k.arch,
                str(k.regs),
                str(k.reg_budget),
                str(k.max_threads or "-"),
                str(k.stack),
                str(k.local),
                "-" if k.local_stores is None else f"{k.local_stores}/{k.local_loads}",
                str(k.shared),
                "FAIL" if k.problems() else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {2, 3, 4, 5, 6, 7, 8}
    return "\n".join(
        "    " + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    )


def check_kernel_resources(c: Checker, kernels: list[KernelResources]) -> None:
    """Fails on any kernel that uses local memory, or has more registers than its launch bounds allow."""
    mangled = sorted({k.name for k in kernels})
    names = dict(zip(mangled, map(short_kernel_name, demangle(mangled))))
    print(resource_table(kernels, names))
    archs = sorted({k.arch for k in kernels})
    c.check(bool(kernels), "cuobjdump --dump-resource-usage lists the kernels", f"{len(kernels)} in {archs}")
    for what, failing in (
        ("no kernel uses local memory (register spills)", [k for k in kernels if k.uses_local_memory]),
        ("every kernel's registers fit its launch bounds", [k for k in kernels if k.regs > k.reg_budget]),
    ):
        c.check(not failing, what, "; ".join(f"{names[k.name]} {k.arch}: {', '.join(k.problems())}" for k in failing))
    unbounded = sorted({names[k.name] for k in kernels if k.max_threads is None})
    if unbounded:
        print(
            f"  info {len(unbounded)} kernel(s) without __launch_bounds__ (no EIATTR_MAX_THREADS; registers checked"
            f" against {MAX_REGS_PER_THREAD} only, the block size is the launcher's): {', '.join(unbounded)}"
        )


def cuobjdump_lines(cuobjdump: str, option: str, so: Path) -> Iterator[str]:
    """One dump, streamed (the ELF and SASS dumps run to tens of MB)."""
    with subprocess.Popen([cuobjdump, option, str(so)], stdout=subprocess.PIPE, text=True) as p:
        yield from p.stdout
    if p.returncode:
        raise subprocess.CalledProcessError(p.returncode, [cuobjdump, option, str(so)])


def read_build_info(text: str) -> dict:
    scope: dict = {}
    exec(compile(text, "_build_info.py", "exec"), scope)
    return scope["BUILD_INFO"]


def check_symbols(c: Checker, so: Path) -> None:
    undefined = [line.split()[-1].split("@")[0] for line in run(["nm", "-D", "--undefined-only", str(so)]).splitlines()]
    demangled = run(["c++filt"] + undefined).splitlines() if undefined else []
    unstable = [d for d in demangled if UNSTABLE_CXX.search(d)]
    c.check(
        not unstable,
        "_C references no c10::/at::/torch:: C++ symbols (torch's unstable ABI)",
        "; ".join(unstable[:10]) if unstable else "",
    )
    shim = [s for s in undefined if s.startswith(("aoti_torch_", "torch_"))]
    c.check(bool(shim), "_C calls torch through its stable C shim", f"{len(shim)} aoti_torch_*/torch_* symbols")
    private_py = [s for s in undefined if s.startswith("_Py") and s not in LIMITED_API_PRIVATE]
    c.check(not private_py, "_C uses Python's limited API only (no private _Py* symbols)", ", ".join(private_py))

    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", run(["readelf", "-d", str(so)]))
    bad = [lib for lib in needed if lib.startswith(("libtorch_python", "libpython"))]
    c.check(not bad, "_C does not link libtorch_python or libpython", ", ".join(bad) or ", ".join(needed))

    own_cxx = [
        line.split()[-1]
        for line in run(["nm", "-D", "--defined-only", str(so)]).splitlines()
        if re.match(r"_ZNK?(3c10|2at|5torch)", line.split()[-1])
    ]
    if own_cxx:  # inline header-only helpers compiled in (e.g. c10::toString(ScalarType)): no dependency
        print(f"  info c10/at/torch inline functions compiled into _C (defined, not imported): {len(own_cxx)}")


def check_cuda(c: Checker, so: Path, info: dict, archs: str, require: bool) -> None:
    built_cuda = info.get("cuda")
    if not built_cuda and not require:
        print("  info CPU-only build: no CUDA checks")
        return
    if not c.check(bool(built_cuda), "_C has CUDA kernels", f"CUDA {built_cuda}" if built_cuda else "a CPU-only build"):
        return
    needed = run(["readelf", "-d", str(so)])
    major = built_cuda.split(".")[0]
    c.check(f"libcudart.so.{major}" in needed, f"_C needs libcudart.so.{major} (the CUDA it was built for)")
    c.check(
        info.get("cuda_arch_list") == archs,
        "build info records the archs asked for",
        f"{info.get('cuda_arch_list')!r} vs {archs!r}",
    )
    cuobjdump = find_cuobjdump()
    if not c.check(cuobjdump is not None, "cuobjdump found", cuobjdump or "set CUOBJDUMP or CUDA_HOME"):
        return
    # cuobjdump exits non-zero when there is no device code at all: that is an empty list.
    listing = lambda what: subprocess.run([cuobjdump, what, str(so)], capture_output=True, text=True).stdout
    elf = set(re.findall(r"\.sm_(\d+a?)\.cubin", listing("--list-elf")))
    ptx = set(re.findall(r"\.sm_(\d+a?)\.ptx", listing("--list-ptx")))
    want_elf, want_ptx = parse_archs(archs)
    c.check(
        want_elf <= elf, f"cuobjdump --list-elf: code for sm_{', sm_'.join(sorted(want_elf))}", f"found {sorted(elf)}"
    )
    c.check(
        want_ptx <= ptx, f"cuobjdump --list-ptx: PTX for compute_{', '.join(sorted(want_ptx))}", f"found {sorted(ptx)}"
    )
    dump = lambda option: cuobjdump_lines(cuobjdump, option, so)
    try:
        kernels = kernel_resources(dump("--dump-resource-usage"), dump("--dump-elf"), dump("--dump-sass"))
    except subprocess.CalledProcessError as e:
        c.check(False, "cuobjdump dumps the kernels' resources", f"{' '.join(e.cmd)} exited {e.returncode}")
        return
    check_kernel_resources(c, kernels)


def check_fastpath(c: Checker, z: zipfile.ZipFile, fastpath: list[str], info: dict, tmp: str) -> None:
    """fusedres._fastpath: present exactly when built, for the CPython the build info names."""
    built_for = info.get("fastpath")  # "cpython-311"
    if not built_for:
        c.check(not fastpath, "no fusedres._fastpath (the build info says it was not built)", ", ".join(fastpath))
        return
    if not c.check(len(fastpath) == 1, f"fusedres._fastpath built for {built_for}", ", ".join(fastpath) or "missing"):
        return
    c.check(f".{built_for}-" in fastpath[0], f"_fastpath's file is for {built_for}", fastpath[0])
    c.check(bool(info.get("torch_git")), "build info: the torch commit _fastpath was built against")
    so = Path(z.extract(fastpath[0], tmp))
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", run(["readelf", "-d", str(so)]))
    c.check(
        not [lib for lib in needed if lib.startswith("libpython")],
        "_fastpath does not link libpython (the interpreter provides it)",
        ", ".join(needed),
    )


def check_wheel(c: Checker, wheel: Path, archs: str, require_cuda: bool) -> None:
    print(f"wheel {wheel}")
    m = WHEEL_NAME.match(wheel.name)
    if not c.check(m is not None, "file name is name-version-python-abi-platform.whl"):
        return
    c.check(
        (m["py"], m["abi"]) == ("cp310", "abi3"),
        "tagged cp310-abi3 (one wheel for CPython >= 3.10)",
        f"{m['py']}-{m['abi']}-{m['plat']}",
    )
    c.check(m["plat"].startswith(("linux_", "manylinux")), "a Linux platform tag", m["plat"])
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        names = z.namelist()
        dist_info = f"fusedres-{m['version']}.dist-info"
        meta = z.read(f"{dist_info}/WHEEL").decode() if f"{dist_info}/WHEEL" in names else ""
        tag = f"{m['py']}-{m['abi']}-{m['plat']}"
        c.check(f"Tag: {tag}\n" in meta, "WHEEL metadata: the file name's tag", meta.replace("\n", " ").strip())
        c.check("Root-Is-Purelib: false" in meta, "WHEEL metadata: not pure Python (platlib)")
        version_line = re.search(r"^Version: (.+)$", z.read(f"{dist_info}/METADATA").decode(), re.M)
        c.check(bool(version_line) and version_line[1] == m["version"], "METADATA version matches the file name")

        stray = sorted({n.split("/")[0] for n in names} - {"fusedres", dist_info})
        c.check(not stray, "nothing but fusedres/ and its .dist-info", ", ".join(stray))
        if not c.check("fusedres/_build_info.py" in names, "fusedres/_build_info.py in the wheel"):
            return
        info = read_build_info(z.read("fusedres/_build_info.py").decode())
        print("  info build info: " + ", ".join(f"{k}={v}" for k, v in info.items()))
        sos = sorted(n for n in names if n.endswith(".so"))
        fastpath = [n for n in sos if n.startswith("fusedres/_fastpath.")]
        if not c.check(
            [n for n in sos if n not in fastpath] == ["fusedres/_C.abi3.so"],
            "one stable-ABI extension: fusedres/_C.abi3.so",
            ", ".join(sos),
        ):
            return
        check_fastpath(c, z, fastpath, info, tmp)
        c.check(info.get("extension") is True, "build info: extension built")
        c.check(info.get("version") == m["version"], "build info version matches the wheel", str(info.get("version")))
        c.check(info.get("stable_abi_target") == "2.10", "build info: stable ABI target 2.10")
        so = Path(z.extract("fusedres/_C.abi3.so", tmp))
        check_symbols(c, so)
        check_cuda(c, so, info, archs, require_cuda)


def check_sdist(c: Checker, sdist: Path) -> None:
    print(f"sdist {sdist}")
    with tarfile.open(sdist) as t:
        top, *_ = t.getnames()[0].split("/")
        names = {n.removeprefix(top + "/") for n in t.getnames()}
    required = {
        "setup.py",
        "build_config.py",
        "pyproject.toml",
        "MANIFEST.in",
        "README.md",
        "COMMIT",
        "fusedres/__init__.py",
    }
    if (ROOT / "csrc").is_dir():  # run from a checkout: every source file it builds from
        required |= {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    missing = sorted(required - names)
    c.check(
        not missing,
        "sdist carries the sources, setup.py, build_config.py, pyproject.toml, MANIFEST.in, COMMIT",
        ", ".join(missing),
    )
    junk = sorted(n for n in names if n.endswith((".so", ".o", ".pyc")) or n == "fusedres/_build_info.py")
    c.check(not junk, "sdist carries no build outputs", ", ".join(junk))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel", type=Path)
    p.add_argument("--sdist", type=Path, help="also check this sdist")
    p.add_argument("--require-cuda", action="store_true", help="fail unless _C has CUDA kernels")
    p.add_argument("--archs", default=DEFAULT_ARCHS, help=f"TORCH_CUDA_ARCH_LIST to expect (default {DEFAULT_ARCHS})")
    args = p.parse_args(argv)
    c = Checker()
    check_wheel(c, args.wheel, args.archs, args.require_cuda)
    if args.sdist:
        check_sdist(c, args.sdist)
    if c.failures:
        print(f"check_wheel: {len(c.failures)} check(s) failed: " + "; ".join(c.failures))
        return 1
    print("check_wheel: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
