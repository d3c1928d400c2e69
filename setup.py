"""Build fusedres._C: CPU kernels always, CUDA kernels whenever torch has CUDA and nvcc is found.

The extension targets torch's stable ABI (torch >= 2.10) and Python's limited API (abi3),
so one build loads on every torch >= 2.10 and Python >= 3.10 of the same CUDA major.
No GPU is needed to build the CUDA kernels: only nvcc.

Environment switches:
  FUSEDRES_CUDA=auto|0|1   auto (default): build CUDA kernels when torch has CUDA and nvcc is
                           found; 0: CPU kernels only; 1: fail if the CUDA kernels cannot be built.
  FUSEDRES_NO_EXTENSION=1  build no C++ extension at all (Triton and reference backends only).
  FUSEDRES_FASTPATH=0|1    0: skip fusedres._fastpath; 1 (default): build it. It is the eager
                           add_norm, batch_norm_add_relu and frozen-BN conv calls as C++ autograd
                           nodes (csrc/fastpath/*.cpp), built
                           against torch's C++ and Python APIs, which have no stable ABI: it loads
                           only under the torch and CPython of the build (elsewhere fusedres runs
                           the same formula in Python).
  CUDA_HOME                the CUDA toolkit; default: /usr/local/cuda, else the parent of the
                           nvcc found on PATH (following symlinks and wrapper scripts is not
                           attempted: set CUDA_HOME when nvcc on PATH is a wrapper).
  TORCH_CUDA_ARCH_LIST     GPU architectures; default "8.0;9.0+PTX" (sm_80 and sm_90 code,
                           plus compute_90 PTX that newer GPUs JIT-compile).
  MAX_JOBS                 parallel compile jobs (ninja).
  FUSEDRES_DEBUG=1         -O0 -g builds.
  FUSEDRES_LOCAL_VERSION   a local version label for the build, e.g. cu13: version 0.1.0+cu13.
  FUSEDRES_COMMIT          the commit recorded in the build info (default: `git rev-parse` of this
                           tree, else the COMMIT file that an sdist carries).
The defaults (arch list, CUDA_HOME) and the FUSEDRES_CUDA decision live in build_config.py, which
scripts/build_wheel.sh and scripts/check_wheel.py share.

The build info (torch and CUDA built against, nvcc, archs, commit, date) goes to
fusedres/_build_info.py, which `python -m fusedres` shows and fusedres/_extension.py checks
against the running torch before loading _C. The version lives in fusedres/_version.py only.
Building an sdist (or only the metadata) needs no torch: the extension is configured for builds.
"""

from __future__ import annotations

import datetime
import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.sdist import sdist

ROOT = os.path.dirname(os.path.abspath(__file__))
# torch's stable ABI as of 2.10 (format: major, minor, patch bytes then an ABI tag).
TORCH_TARGET_VERSION = "0x020a000000000000"
PY_LIMITED_API = "0x030A0000"  # Python 3.10 (spelled as torch's BuildExtension adds it too: no redefinition warning)


# setup.py commands that need no compiled extension (and so no torch): source and metadata only.
NO_EXTENSION_COMMANDS = {"sdist", "egg_info", "dist_info", "--name", "--version"}


def load_build_config():
    # By path: a PEP 517 backend does not put this directory on sys.path.
    spec = importlib.util.spec_from_file_location("build_config", os.path.join(ROOT, "build_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_config = load_build_config()


def generate_spec_headers() -> str:
    """Writes the C++ headers derived from the operator spec (fusedres/spec/cpp.py) under
    build/generated and returns that include directory. The spec is loaded by path, as a package
    of its own: importing fusedres would need the extension being built."""
    spec_dir = os.path.join(ROOT, "fusedres", "spec")
    spec = importlib.util.spec_from_file_location(
        "_fusedres_spec", os.path.join(spec_dir, "__init__.py"), submodule_search_locations=[spec_dir]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    out = os.path.join(ROOT, "build", "generated")
    importlib.import_module("_fusedres_spec.cpp").write_headers(out)
    return out


def read_version() -> str:
    scope: dict = {}
    with open(os.path.join(ROOT, "fusedres", "_version.py")) as f:
        exec(f.read(), scope)
    version = scope["__version__"]
    local = os.environ.get("FUSEDRES_LOCAL_VERSION", "").strip()
    if local and not re.fullmatch(r"[A-Za-z0-9]+(\.[A-Za-z0-9]+)*", local):
        raise SystemExit(f"FUSEDRES_LOCAL_VERSION must be a local version label like cu13, got {local!r}")
    return f"{version}+{local}" if local else version


def pip_cuda_include_dirs() -> list[str]:
    """Headers that torch's CUDA build expects but a bare toolkit may lack (cusparse, cublas):
    pip's nvidia-* wheels ship them under site-packages/nvidia/<pkg>/include."""
    dirs = []
    for entry in sys.path:
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def git_commit() -> str:
    """FUSEDRES_COMMIT, else this tree's git commit (only when ROOT is the top of a checkout, not an
    sdist unpacked somewhere inside another repository), else the COMMIT file an sdist carries."""
    if os.environ.get("FUSEDRES_COMMIT"):
        return os.environ["FUSEDRES_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        lines = out.stdout.split()
        if out.returncode == 0 and len(lines) == 2 and os.path.samefile(lines[0], ROOT):
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
            )
            return lines[1] + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    try:
        with open(os.path.join(ROOT, "COMMIT")) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


def nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    except OSError:
        return None
    match = re.search(r"release [\d.]+, V([\d.]+)", out.stdout)
    return match.group(1) if match else None


def build_date() -> str:
    # SOURCE_DATE_EPOCH: reproducible builds pin the date.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch else None
    return (when or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")


class SdistWithCommit(sdist):
    """The sdist carries the commit it was made from (COMMIT), for the build info of wheels built from it."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        with open(os.path.join(base_dir, "COMMIT"), "w") as f:
            f.write(git_commit() + "\n")


def write_build_info(**info) -> None:
    path = os.path.join(ROOT, "fusedres", "_build_info.py")
    with open(path, "w") as f:
        f.write('"""Written by setup.py at build time."""\n\nBUILD_INFO = {\n')
        for key, value in info.items():
            f.write(f"    {key!r}: {value!r},\n")
        f.write("}\n")


def get_extensions():
    if NO_EXTENSION_COMMANDS & set(sys.argv[1:]):
        return [], {}
    if os.environ.get("FUSEDRES_NO_EXTENSION", "0") == "1":
        write_build_info(extension=False, version=read_version(), commit=git_commit(), build_date=build_date())
        return [], {}

    cuda_mode = build_config.cuda_mode()
    cuda_home = build_config.find_cuda_home() if cuda_mode != "0" else None
    if cuda_home:
        # Settled before torch.utils.cpp_extension is imported: it guesses CUDA_HOME on import.
        os.environ["CUDA_HOME"] = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = build_config.arch_list()

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    use_cuda = build_config.use_cuda(cuda_mode, cuda_home, torch.version.cuda)

    debug = os.environ.get("FUSEDRES_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    defines = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}", f"-DPy_LIMITED_API={PY_LIMITED_API}"]
    # -fopenmp-simd honours `#pragma omp simd reduction` (vectorized fp32 sums) without the
    # OpenMP runtime; threads come from torch's own parallel_for.
    cxx = opt + defines + ["-std=c++17", "-fopenmp-simd", "-fdiagnostics-color=always"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    extra_compile_args = {"cxx": cxx}
    extension = CppExtension
    fallback_includes = []
    if use_cuda:
        extension = CUDAExtension
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        cxx.append("-DFUSEDRES_WITH_CUDA")
        # -DUSE_CUDA declares aoti_torch_get_current_cuda_stream in torch's C shim.
        extra_compile_args["nvcc"] = (
            opt
            + defines
            + [
                "-std=c++17",
                "-DUSE_CUDA",
                "-DFUSEDRES_WITH_CUDA",
                # No --use_fast_math: it flushes denormals, which eager keeps; these kernels are
                # memory-bound, so it would buy nothing.
                "-lineinfo",
                "--expt-relaxed-constexpr",
            ]
        )
        if not os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
            fallback_includes = pip_cuda_include_dirs()
    for inc in fallback_includes:
        # After the toolkit's own headers, so a newer pip runtime header never shadows nvcc's.
        cxx.append(f"-idirafter{inc}")
        if use_cuda:
            extra_compile_args["nvcc"].append(f"-Xcompiler=-idirafter{inc}")

    generated = generate_spec_headers()
    build_fastpath = os.environ.get("FUSEDRES_FASTPATH", "1") != "0"
    # fusedres/_extension.py compares these with the running torch before it loads _C.
    write_build_info(
        extension=True,
        version=read_version(),
        torch=torch.__version__,  # the torch built against (any torch >= stable_abi_target loads _C)
        torch_cuda=torch.version.cuda,  # that torch's CUDA (None: a CPU build)
        cuda=torch.version.cuda if use_cuda else None,  # CUDA kernels built, for this CUDA (its major)
        nvcc=nvcc_version(cuda_home) if use_cuda else None,
        cuda_home=cuda_home if use_cuda else None,
        cuda_arch_list=os.environ["TORCH_CUDA_ARCH_LIST"] if use_cuda else None,
        torch_git=torch.version.git_version,  # fusedres._fastpath needs this exact torch
        fastpath=f"cpython-{sys.version_info[0]}{sys.version_info[1]}" if build_fastpath else None,
        stable_abi_target="2.10",
        python_limited_api="3.10",
        platform=f"{platform.system().lower()}_{platform.machine()}",
        commit=git_commit(),
        build_date=build_date(),
    )
    ext = extension(
        "fusedres._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc"), generated],
        extra_compile_args=extra_compile_args,
        # dlopen/dlsym (csrc/cpu/output_pool.cpp) live in libdl before glibc 2.34.
        libraries=["dl"] if platform.system() == "Linux" else [],
        py_limited_api=True,
    )
    extensions = [ext]
    if build_fastpath:
        # Not py_limited_api: torch's Python bindings (pybind11) need the full CPython API.
        extensions.append(
            CppExtension(
                "fusedres._fastpath",
                sorted(glob.glob(os.path.join("csrc", "fastpath", "*.cpp"))),
                include_dirs=[os.path.join(ROOT, "csrc"), generated],
                # -g0 (unless FUSEDRES_DEBUG): Python's own CFLAGS add -g, which makes this 14 MB.
                extra_compile_args={"cxx": opt + ([] if debug else ["-g0"]) + ["-fdiagnostics-color=always"]},
            )
        )
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = get_extensions()

setup(
    version=read_version(),
    packages=find_packages(include=["fusedres", "fusedres.*"]),
    ext_modules=ext_modules,
    cmdclass={"sdist": SdistWithCommit, **cmdclass},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
