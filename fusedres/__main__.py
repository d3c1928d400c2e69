"""`python -m fusedres`: what is installed, what loaded, and which backends run where."""

from __future__ import annotations

import os
import platform


def build_info_report(info: dict) -> dict:
    """The build record that setup.py wrote (fusedres/_build_info.py), as report lines."""
    if not info.get("extension"):
        return {"_C build": "none (a source tree without a build, or FUSEDRES_NO_EXTENSION=1)"}
    get = lambda key: info.get(key, "n/a")
    return {
        "_C built against torch": f"{get('torch')} (CUDA {get('torch_cuda') or 'none'})",
        "_C ABI": f"torch stable ABI {get('stable_abi_target')}, Python limited API {get('python_limited_api')}",
        "_C CUDA kernels": (
            f"yes, CUDA {info['cuda']} (nvcc {get('nvcc')}), archs {get('cuda_arch_list')}"
            if info.get("cuda")
            else "no"
        ),
        "_C build": f"commit {get('commit')}, {get('build_date')}, {get('platform')}",
    }


def backend_report(device: str) -> dict:
    """Which backends run on `device` (auto's choice first), and why the others do not."""
    from fusedres.backends import available_backends, backend_support

    support = backend_support(device)
    lines = {f"backends ({device})": ", ".join(available_backends(device))}
    for name, s in support.items():
        lines[f"  {name}"] = ("yes: " if s.usable else "no: ") + s.why
    return lines


def _pool_report(capacity: int, loaded: bool) -> str:
    if capacity:
        return f"outputs of 1 MiB and more reuse freed blocks, up to {capacity >> 20} MiB kept (FUSEDRES_CPU_POOL_MB)"
    if not loaded:
        return "off (fusedres._C not loaded)"
    if os.environ.get("FUSEDRES_CPU_POOL_MB", "").strip():
        return "off (FUSEDRES_CPU_POOL_MB)"
    return "off (needs torch >= 2.11)"


def environment_report() -> dict:
    import torch

    import fusedres
    from fusedres._extension import BUILD_INFO, EXTENSION_ERROR, EXTENSION_LOADED, FASTPATH_ERROR

    try:
        import triton

        triton_version = triton.__version__
    except ImportError as e:
        triton_version = f"not installed ({e})"
    report = {
        "fusedres": f"{fusedres.__version__} at {os.path.dirname(fusedres.__file__)}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "_C loaded": "yes" if EXTENSION_LOADED else f"no: {EXTENSION_ERROR}",
        "_fastpath loaded": (  # the eager add_norm call as a C++ autograd node
            f"yes (built for torch {BUILD_INFO.get('torch')}, {BUILD_INFO.get('fastpath')})"
            if FASTPATH_ERROR is None
            else f"no: {FASTPATH_ERROR}"
        ),
        **build_info_report(BUILD_INFO),
        "selected backend": fusedres.get_backend(),
        **backend_report("cpu"),
        "CPU output pool": _pool_report(fusedres.cpu_pool_stats()["capacity_bytes"], EXTENSION_LOADED),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            report[f"GPU {i}"] = (
                f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                f"{props.multi_processor_count} SMs"
            )
            report.update(backend_report(f"cuda:{i}"))
    else:
        report["GPU"] = "none visible to torch"
    return report


def main() -> None:
    report = environment_report()
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
