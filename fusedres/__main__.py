"""`python -m fusedres`: what is installed, what loaded, and which backends run where."""

from __future__ import annotations

import os
import platform


def environment_report() -> dict:
    import torch

    import fusedres
    from fusedres._extension import BUILD_INFO, EXTENSION_ERROR, EXTENSION_LOADED

    try:
        import triton

        triton_version = triton.__version__
    except ImportError as e:
        triton_version = f"not installed ({e})"
    report = {
        "fusedres": fusedres.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "_C loaded": "yes" if EXTENSION_LOADED else f"no: {EXTENSION_ERROR}",
        "_C built against torch": BUILD_INFO.get("torch", "n/a"),
        "_C CUDA kernels": (
            f"yes, CUDA {BUILD_INFO['cuda']}, archs {BUILD_INFO.get('cuda_arch_list')}"
            if BUILD_INFO.get("cuda")
            else "no"
        ),
        "_C commit": BUILD_INFO.get("commit", "n/a"),
        "selected backend": fusedres.get_backend(),
        "backends (cpu)": ", ".join(fusedres.available_backends("cpu")),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            report[f"GPU {i}"] = (
                f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                f"{props.multi_processor_count} SMs"
            )
        report["backends (cuda)"] = ", ".join(fusedres.available_backends("cuda"))
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
