"""scripts/check_wheel.py's check of the CUDA kernels' resources, on canned cuobjdump output: no GPU,
no build, no cuobjdump. The samples are cut from `cuobjdump --dump-resource-usage / --dump-elf /
--dump-sass` of a real fusedres._C (sm_80 + sm_90 cubins, compute_90 PTX), with two kernels changed
to fail: one spills (sm_80), one has more registers than its launch bound allows (sm_90)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_wheel.py"
if not SCRIPT.exists():
    pytest.skip("scripts/ is not in the sdist: these tests run from a checkout", allow_module_level=True)
_spec = importlib.util.spec_from_file_location("check_wheel", SCRIPT)
check_wheel = sys.modules["check_wheel"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(check_wheel)

_NS = "_ZN8fusedres49_GLOBAL__N__3b600a5f_11_add_norm_cu_da3cb64f_7211"
ROWS_F32 = _NS + "24add_norm_fwd_rows_kernelILi1EffffEEvNS0_7FwdArgsIT0_T1_T2_T3_EE"
ROWS_F64 = _NS + "24add_norm_fwd_rows_kernelILi1EddddEEvNS0_7FwdArgsIT0_T1_T2_T3_EE"  # spills on sm_80
LONG_ROWS = _NS + "29add_norm_fwd_long_rows_kernelIffffEEvNS0_7FwdArgsIT_T0_T1_T2_EE"  # over budget on sm_90
PARAMS = (  # no __launch_bounds__
    "_ZN8fusedres51_GLOBAL__N__6d746880_13_batch_norm_cu_da3cb64f_728317fwd_params_kernelIfEEvPKT_S4_PKviS6_iPNS0_"
    "10ChanParamsIS2_EEl"
)


def _header(kind: str, arch: str) -> str:
    return f"""
Fatbin {kind} code:
================
arch = {arch}
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /tmp/build/fusedres-0.1.0/csrc/cuda/add_norm.cu
"""


def _usage(arch: str, rows: dict[str, str]) -> str:
    functions = "".join(
        f" Function {name}:\n  {fields} CONSTANT[0]:480 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
        for name, fields in rows.items()
    )
    return _header("elf", arch) + "\nResource usage:\n Common:\n  GLOBAL:28 CONSTANT[4]:224\n" + functions


RESOURCE_USAGE = (
    _usage(
        "sm_80",
        {
            ROWS_F32: "REG:118 STACK:0 SHARED:256 LOCAL:0",
            ROWS_F64: "REG:64 STACK:8 SHARED:256 LOCAL:0",
            LONG_ROWS: "REG:96 STACK:0 SHARED:256 LOCAL:0",
            PARAMS: "REG:16 STACK:0 SHARED:0 LOCAL:0",
        },
    )
    # compute_90 PTX: listed, but no cubin, so no kernels of its own
    + _header("ptx", "sm_90")
    + "compressed\nptxasOptions =  --generate-line-info \n"
    + _usage(
        "sm_90",
        {
            ROWS_F32: "REG:122 STACK:0 SHARED:256 LOCAL:0",
            ROWS_F64: "REG:72 STACK:0 SHARED:256 LOCAL:0",
            LONG_ROWS: "REG:168 STACK:0 SHARED:256 LOCAL:0",
            PARAMS: "REG:16 STACK:0 SHARED:0 LOCAL:0",
        },
    )
)


def _attribute(index: int, name: str, fmt: str, value: str) -> str:
    return f"\t<{hex(index)}>\n\tAttribute:\t{name}\n\tFormat:\t{fmt}\n\tValue:\t{value}\n"


def _nv_info(name: str, max_threads: int | None) -> str:
    attrs = _attribute(1, "EIATTR_CUDA_API_VERSION", "EIFMT_SVAL", "0x82 ")
    if max_threads:
        attrs += _attribute(6, "EIATTR_MAXREG_COUNT", "EIFMT_HVAL", hex(65536 // max_threads))
        attrs += _attribute(0x13, "EIATTR_MAX_THREADS", "EIFMT_SVAL", f"{hex(max_threads)} 0x1 0x1 ")
    attrs += _attribute(0x14, "EIATTR_CRS_STACK_SIZE", "EIFMT_SVAL", "0x0 ")
    return f"\n\n.nv.info.{name}\n{attrs}"


def _elf(arch: str) -> str:
    return (
        _header("elf", arch)
        + "\n.nv.info\n\t<0x1>\n\tAttribute:\tEIATTR_REGCOUNT\n\tFormat:\tEIFMT_SVAL\n"
        + f"\tValue:\tfunction: {ROWS_F32}(0x18b)\tregister count: 118\n"
        # the PTX kept for debugging (.nv_debug_ptx_txt) says .maxntid too; the ELF attribute is read
        + ".visible .entry fake(\n.maxntid 1024, 1, 1\n"
        + _nv_info(ROWS_F32, 512)
        + _nv_info(ROWS_F64, 512)
        + _nv_info(LONG_ROWS, 512)
        + _nv_info(PARAMS, None)
        + f"\n\n.text.{ROWS_F32}\nlmem=0\tsmem=256\n0xff017624 0x00000a00 0x078e00ff 0x000fc600\n"
    )


ELF = _elf("sm_80") + _header("ptx", "sm_90") + "compressed\n" + _elf("sm_90")

_IMAD = "        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;    /* 0x00000a00ff017624 */\n"
_STL = "        /*02c0*/                   STL [R1], R0 ;                             /* 0x0000000001007387 */\n"
_LDL = "        /*0330*/              @!P1 LDL R0, [R1] ;                             /* 0x0000000001007983 */\n"


def _sass(arch: str, spill: bool) -> str:
    text = _header("elf", arch) + f"\n\tcode for {arch}\n\t.target\t{arch}\n"
    for name in (ROWS_F32, ROWS_F64, LONG_ROWS, PARAMS):
        text += f'\n\t\tFunction : {name}\n\t.headerflags\t@"EF_CUDA_{arch.upper()}"\n' + _IMAD
        if spill and name == ROWS_F64:
            text += _STL + _IMAD + _LDL
        text += "\t\t..........\n"
    return text


SASS = _sass("sm_80", spill=True) + _sass("sm_90", spill=False)


def _kernels() -> dict[tuple[str, str], object]:
    kernels = check_wheel.kernel_resources(RESOURCE_USAGE.splitlines(), ELF.splitlines(), SASS.splitlines())
    return {(k.arch, k.name): k for k in kernels}


@pytest.mark.parametrize(
    "threads, budget",
    [(32, 255), (128, 255), (256, 255), (384, 168), (512, 128), (640, 96), (768, 80), (1000, 64), (1024, 64)],
)
def test_register_budget(threads, budget):
    # What nvcc caps __launch_bounds__(threads) at: one block must fit 65536 registers, 8 at a time.
    assert check_wheel.register_budget(threads) == budget
    warps = -(-threads // 32)
    assert warps * 32 * budget <= 65536


def test_parses_every_kernel_of_every_cubin():
    kernels = _kernels()
    assert sorted(kernels) == sorted(
        (arch, n) for arch in ("sm_80", "sm_90") for n in (ROWS_F32, ROWS_F64, LONG_ROWS, PARAMS)
    )
    rows = kernels[("sm_80", ROWS_F32)]
    assert (rows.regs, rows.stack, rows.local, rows.shared) == (118, 0, 0, 256)
    assert (rows.max_threads, rows.reg_budget) == (512, 128)  # from EIATTR_MAX_THREADS, not the PTX's .maxntid
    assert (rows.local_stores, rows.local_loads) == (0, 0)
    assert rows.problems() == []
    params = kernels[("sm_90", PARAMS)]
    assert (params.max_threads, params.reg_budget, params.problems()) == (None, 255, [])


def test_spilling_kernel_fails():
    spilling = _kernels()[("sm_80", ROWS_F64)]
    assert (spilling.stack, spilling.local_stores, spilling.local_loads) == (8, 1, 1)
    assert spilling.problems() == ["local memory (spills): STACK 8 B, LOCAL 0 B, 1 STL / 1 LDL"]
    assert _kernels()[("sm_90", ROWS_F64)].problems() == []  # the same kernel on sm_90 does not spill


def test_local_memory_without_sass_fails_on_stack_alone():
    kernels = check_wheel.kernel_resources(RESOURCE_USAGE.splitlines(), ELF.splitlines())
    spilling = [k for k in kernels if k.uses_local_memory]
    assert [(k.arch, k.name) for k in spilling] == [("sm_80", ROWS_F64)]
    assert spilling[0].problems() == ["local memory (spills): STACK 8 B, LOCAL 0 B"]


def test_over_budget_kernel_fails():
    over = _kernels()[("sm_90", LONG_ROWS)]
    assert (over.regs, over.max_threads, over.reg_budget) == (168, 512, 128)
    assert over.problems() == [
        "168 registers > 128, the most a block of 512 threads (its launch bound) can have in the 65536-register file"
    ]
    assert _kernels()[("sm_80", LONG_ROWS)].problems() == []


def test_check_reports_both_failures_and_prints_the_table(capsys):
    c = check_wheel.Checker()
    check_wheel.check_kernel_resources(c, list(_kernels().values()))
    out = capsys.readouterr().out
    assert c.failures == [
        "no kernel uses local memory (register spills)",
        "every kernel's registers fit its launch bounds",
    ]
    table = [line.split() for line in out.splitlines() if line.startswith("    ")]
    assert table[0] == ["kernel", "arch", "regs", "reg", "cap", "threads", "stack", "local", "STL/LDL", "shared"]
    assert len(table) == 1 + 8
    failing = [row for row in table if row[-1] == "FAIL"]
    assert len(failing) == 2
    assert any("sm_80" in row and "1/1" in row for row in failing)  # the spill
    assert any("sm_90" in row and "168" in row for row in failing)  # the registers
    assert "without __launch_bounds__" in out and "fwd_params_kernel" in out


def test_a_clean_build_passes():
    clean = RESOURCE_USAGE.replace("STACK:8", "STACK:0").replace("REG:168", "REG:128")
    sass = SASS.replace(_STL, "").replace(_LDL, "")
    c = check_wheel.Checker()
    check_wheel.check_kernel_resources(c, check_wheel.kernel_resources(clean.splitlines(), ELF.splitlines(), sass))
    assert c.failures == []


def test_short_kernel_names():
    demangled = (
        "void fusedres::(anonymous namespace)::add_norm_bwd_cols_kernel<__nv_bfloat16, float>(__nv_bfloat16 const*, "
        "long, float const*, long, fusedres::cuda::AccOf<__nv_bfloat16>::type const*, bool, long)"
    )
    assert check_wheel.short_kernel_name(demangled) == "add_norm_bwd_cols_kernel<bf16, float>"
    nested = (
        "void fusedres::(anonymous namespace)::reduce_cl_kernel<fusedres::(anonymous namespace)::StatsOp<__half, 8> >("
        "fusedres::(anonymous namespace)::StatsOp<__half, 8>, fusedres::(anonymous namespace)::ClGeom)"
    )
    assert check_wheel.short_kernel_name(nested) == "reduce_cl_kernel<StatsOp<half, 8>>"
