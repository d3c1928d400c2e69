#!/usr/bin/env python3
"""Checks a built fusedres wheel (and optionally its sdist) before anyone installs it.

    python scripts/check_wheel.py dist/fusedres-*.whl [--sdist dist/fusedres-*.tar.gz]
                                  [--require-cuda] [--archs "8.0;9.0+PTX"]

Wheel: named and tagged cp310-abi3 (one wheel for every CPython >= 3.10), not pure; nothing
but fusedres/ and its .dist-info; one extension, fusedres/_C.abi3.so; fusedres/_build_info.py
present and consistent with the metadata. _C: no undefined c10::/at::/torch:: (C++, unstable ABI)
symbols, only torch's stable C shim (aoti_torch_*, torch_*); no libtorch_python or libpython
dependency; Python symbols from the limited API. CUDA (when the build info says so, or
--require-cuda): `cuobjdump --list-elf` shows code for every arch in --archs and `--list-ptx` PTX
for those marked +PTX; _C needs the libcudart of the CUDA major it was built for. sdist: carries
csrc/, setup.py, build_config.py, pyproject.toml, MANIFEST.in, COMMIT, and no build outputs.

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
        sos = [n for n in names if n.endswith(".so")]
        if not c.check(sos == ["fusedres/_C.abi3.so"], "exactly one extension: fusedres/_C.abi3.so", ", ".join(sos)):
            return
        if not c.check("fusedres/_build_info.py" in names, "fusedres/_build_info.py in the wheel"):
            return
        info = read_build_info(z.read("fusedres/_build_info.py").decode())
        print("  info build info: " + ", ".join(f"{k}={v}" for k, v in info.items()))
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
