"""The benchmark's own pieces: byte model, timer, parity report, peer mapping, reports, compare,
and a CPU smoke run of the CLI."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fusedres.bench import cli, compare, environment, harness, parity, peers, providers, registry, report
from fusedres.bench.add_norm import NormCase
from fusedres.bench.batch_norm import BNCase
from fusedres.bench.byte_model import add_norm_bytes, batch_norm_add_relu_bytes, copy_bytes
from fusedres.bench.timing import measure, peak_memory_mb, quantiles, rotation_copies

CPU = torch.device("cpu")

# --- byte model ---------------------------------------------------------------------------------


def _ln_bytes(direction, *, residual=torch.bfloat16, prenorm=False):
    return add_norm_bytes(
        16,
        8,
        x_dtype=torch.bfloat16,
        residual_dtype=residual,
        h_dtype=residual,
        weight_dtype=torch.bfloat16,
        has_bias=True,
        rms_norm=False,
        prenorm=prenorm,
        store_h=True,
        direction=direction,
    )


def test_add_norm_byte_model():
    m, n = 16, 8
    fwd = _ln_bytes("fwd")
    # read x, residual; write y, h (2 bytes each); weight + bias; mean + rstd in fp32
    assert fwd == m * n * 2 * 4 + n * 2 * 2 + m * 4 * 2
    bwd = _ln_bytes("bwd")
    assert bwd == m * n * 2 * 3 + 2 * n * 2 * 2 + m * 4 * 2  # dy, h read; dx written
    assert _ln_bytes("fwd+bwd") == fwd + bwd
    # prenorm backward also reads dh
    assert _ln_bytes("bwd", prenorm=True) == bwd + m * n * 2
    assert copy_bytes(10, torch.float32) == 80


def test_add_norm_byte_model_fp32_residual_stream():
    m, n = 16, 8
    # bf16 x read and y written; fp32 residual read and h written
    assert _ln_bytes("fwd", residual=torch.float32) == m * n * (2 + 4 + 2 + 4) + n * 2 * 2 + m * 4 * 2
    # dy (bf16), h (fp32) read; dx (bf16) and a separate fp32 dresidual written
    assert _ln_bytes("bwd", residual=torch.float32) == m * n * (2 + 4 + 2 + 4) + 2 * n * 2 * 2 + m * 4 * 2


def test_batch_norm_byte_model():
    kw = dict(dtype=torch.float32, residual=True, training=True)
    assert batch_norm_add_relu_bytes(100, 4, direction="fwd", **kw) == 100 * 4 * 4 + 4 * 16
    assert batch_norm_add_relu_bytes(100, 4, direction="bwd", **kw) == 100 * 4 * 7 + 4 * 16
    # eval reads x once: no statistics pass
    eval_kw = dict(kw, training=False)
    assert batch_norm_add_relu_bytes(100, 4, direction="fwd", **eval_kw) == 100 * 4 * 3 + 4 * 16


def test_cases_use_the_byte_model():
    case = NormCase(16, 8, torch.bfloat16, rms_norm=False)
    assert case.bytes_moved("fwd") == _ln_bytes("fwd")
    with pytest.raises(ValueError, match="direction"):
        case.bytes_moved("sideways")


# --- timing -------------------------------------------------------------------------------------


def test_quantiles_are_nearest_rank():
    t = quantiles([5.0, 1.0, 4.0, 2.0, 3.0, 100.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.reps) == (3.5, 2.0, 5.0, 6)
    with pytest.raises(ValueError):
        quantiles([])


def test_measure_times_a_sleep_on_cpu():
    t = measure(lambda: time.sleep(0.002), CPU, warmup=1, reps=5)
    assert t.reps == 5 and t.method == "perf_counter"
    assert 2.0 <= t.p20_ms <= t.median_ms <= t.p80_ms < 200


def test_measure_rotates_and_stops_at_max_seconds():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    measure(fns, CPU, warmup=1, reps=6)
    assert calls == [0, 1, 2] + [0, 1, 2, 0, 1, 2]  # a warm-up round over every copy, then in turn
    t = measure(lambda: time.sleep(0.02), CPU, warmup=0, reps=1000, max_seconds=0.05)
    assert 1 <= t.reps < 10


@pytest.mark.parametrize(
    ("bytes_per_call", "cache", "expected"),
    [
        (None, 50 * 2**20, 1),  # no byte model: nothing to size the rotation by
        (10 * 2**20, 0, 1),  # CPU: no rotation
        (10 * 2**20, 50 * 2**20, 10),  # twice the cache over 10 MiB calls
        (1 * 2**20, 50 * 2**20, 64),  # capped
        (400 * 2**20, 50 * 2**20, 1),  # one call is larger than the cache already
    ],
)
def test_rotation_copies(bytes_per_call, cache, expected):
    assert rotation_copies(bytes_per_call, cache) == expected


def test_peak_memory_is_not_measured_on_cpu():
    assert peak_memory_mb(lambda: torch.ones(10), CPU) is None


def test_cuda_graphs_only_for_small_cases_on_cuda():
    small, large = NormCase(1024, 1024, torch.bfloat16, True), NormCase(65536, 8192, torch.bfloat16, True)
    cuda = torch.device("cuda")
    assert harness.uses_cuda_graph(small, cuda) and not harness.uses_cuda_graph(large, cuda)
    assert not harness.uses_cuda_graph(small, cuda, enabled=False)
    assert not harness.uses_cuda_graph(small, CPU)


# --- parity -------------------------------------------------------------------------------------

PARITY_CASES = [
    NormCase(8, 32, torch.float32, rms_norm=False, prenorm=True),
    NormCase(8, 32, torch.float32, rms_norm=True),
    NormCase(8, 32, torch.bfloat16, rms_norm=True, prenorm=True, residual_in_fp32=True),
    NormCase(8, 32, torch.float32, rms_norm=False, dropout_p=0.25),
    NormCase(8, 32, torch.bfloat16, rms_norm=False, prenorm=True, scales=True),
    BNCase((2, 3, 4, 4), torch.float32, channels_last=True),
    BNCase((2, 3, 4, 4), torch.float32, channels_last=False, training=False),
]


def _cpu_fns(case):
    provs, _ = providers.providers(CPU, names=["eager", "fusedres"], peers=False)
    return {p.name: p.make(case) for p in provs}


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.label)
def test_parity_passes_for_fusedres_and_names_every_tensor(case):
    report_ = parity.parity(case, case.make_inputs(CPU, small=True), _cpu_fns(case))
    assert report_["eager"]["pass"] is None and not report_["eager"]["judged"]
    fused = report_["fusedres-cpu"]
    assert fused["pass"] is True and fused["judged"], fused
    grads = [f"d{n}" for n, t in zip(case.input_names, case.make_inputs(CPU, small=True)) if t is not None]
    assert list(fused["tensors"]) == [*case.output_names, *grads]
    for t in fused["tensors"].values():
        assert t["abs"] <= t["bound"] and t["rel"] >= 0


def test_dropout_parity_judges_the_mask_and_only_fusedres():
    case = NormCase(8, 32, torch.float32, rms_norm=False, dropout_p=0.25)
    fns = _cpu_fns(case)
    fns["compile"] = fns["eager"]
    right = fns["fusedres-cpu"]

    def other_mask(*inputs):
        torch.manual_seed(12345)  # a different draw than the reference's
        return right(*inputs)

    fns["fusedres-other-mask"] = other_mask
    report_ = parity.parity(case, case.make_inputs(CPU, small=True), fns)
    assert report_["fusedres-cpu"]["pass"] is True
    assert report_["fusedres-other-mask"]["pass"] is False
    assert report_["compile"]["pass"] is None and "mask" in report_["compile"]["note"]


def test_parity_fails_a_wrong_fusedres_and_reports_errors():
    case = NormCase(8, 32, torch.float32, rms_norm=False)
    fns = _cpu_fns(case)
    wrong = fns["fusedres-cpu"]
    fns["fusedres-cpu"] = lambda *inputs: wrong(*inputs) * 1.01

    def raises(*inputs):
        raise RuntimeError("no kernel")

    fns["fusedres-broken"] = raises
    report_ = parity.parity(case, case.make_inputs(CPU, small=True), fns)
    assert report_["fusedres-cpu"]["pass"] is False and parity.failed(report_["fusedres-cpu"])
    assert not report_["fusedres-cpu"]["tensors"]["y"]["pass"]
    assert "no kernel" in report_["fusedres-broken"]["error"] and parity.failed(report_["fusedres-broken"])
    assert not parity.failed(report_["eager"])


@pytest.mark.parametrize(("shape", "batch"), [((256, 256, 56, 56), 1), ((256, 2048, 7, 7), 10), ((2, 8, 8, 8), 2)])
def test_bn_parity_inputs_stay_near_a_million_elements(shape, batch):
    x = BNCase(shape, torch.float32, True).make_inputs(CPU, small=True)[0]
    assert x.shape == (batch, *shape[1:]) and x.is_contiguous(memory_format=torch.channels_last)


def test_relative_error_is_normwise():
    ref = torch.tensor([0.0, 1e-9, 4.0])
    assert parity.max_rel_error(ref + torch.tensor([0.0, 1e-3, 0.0]), ref) == pytest.approx(1e-3 / 4)
    assert parity.max_rel_error(torch.ones(2), torch.zeros(2)) == pytest.approx(1 / parity.TINY)


def test_tensor_names_fall_back_to_positions():
    bare = SimpleNamespace()
    assert parity.tensor_names(bare, [torch.ones(1), None, torch.ones(1)], 2) == ["out0", "out1", "dinput0", "dinput2"]


# --- peers --------------------------------------------------------------------------------------


def _fake_apis():
    """Stand-ins computing what each peer's kernel computes, to check the mapping around them."""
    liger = SimpleNamespace(
        layer_norm=lambda x, w, b, eps: F.layer_norm(x, x.shape[-1:], w, b, eps),
        fused_add_rms_norm=lambda x, r, w, eps, offset, mode, in_place: (
            F.rms_norm(x + r, x.shape[-1:], w, eps),
            x + r,
        ),
    )

    def layer_norm_fn(
        x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False, is_rms_norm=False
    ):
        h = x + residual
        norm = (
            F.rms_norm(h, h.shape[-1:], weight, eps)
            if is_rms_norm
            else F.layer_norm(h, h.shape[-1:], weight, bias, eps)
        )
        return (norm.to(x.dtype), h) if prenorm else norm.to(x.dtype)

    apex = SimpleNamespace(
        layer_norm=lambda x, w, b, shape, eps: F.layer_norm(x, shape, w, b, eps),
        rms_norm=lambda x, w, shape, eps: F.rms_norm(x, shape, w, eps),
    )
    return {"liger": liger, "flash-attn": SimpleNamespace(layer_norm_fn=layer_norm_fn), "apex": apex}


NORM_FORMS = [
    NormCase(8, 32, torch.float32, rms, pre, fp32res)
    for rms in (False, True)
    for pre in (False, True)
    for fp32res in (False, True)
    if not fp32res or pre
]


@pytest.mark.parametrize("peer", peers.PEERS, ids=lambda p: p.name)
@pytest.mark.parametrize("case", NORM_FORMS, ids=lambda c: c.label)
def test_peer_mapping_matches_eager(peer, case):
    reason = peer.supports(case)
    if case.residual_in_fp32 and peer.name in ("liger", "apex"):
        assert reason and "fp32 residual" in reason
        return
    assert reason is None
    fn = peer.build(_fake_apis()[peer.name], case)
    inputs = case.make_inputs(CPU)
    got, want = fn(*inputs), case.eager()(*inputs)
    got, want = (got, want) if case.prenorm else ((got,), (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_liger_keeps_incoming_grads_and_matches_rms_norm_rounding():
    seen = {}

    def fused_add_rms_norm(x, r, w, eps, offset, mode, in_place):
        seen.update(offset=offset, mode=mode, in_place=in_place)
        return x + r, x + r

    peers._build_liger(SimpleNamespace(fused_add_rms_norm=fused_add_rms_norm), NormCase(4, 8, torch.float32, True))(
        *NormCase(4, 8, torch.float32, True).make_inputs(CPU)
    )
    assert seen == {"offset": 0.0, "mode": "gemma", "in_place": False}


@pytest.mark.parametrize("peer", peers.PEERS, ids=lambda p: p.name)
def test_peers_skip_other_ops(peer):
    assert peer.supports(BNCase((2, 3, 4, 4), torch.float32, True))


def test_available_peers_explains_what_is_left_out():
    def missing():
        raise ImportError("No module named 'nope'")

    def broken():
        raise RuntimeError("no GPU at import")

    fake = [
        peers.Peer("gpu-only", "gpu-only", True, missing, lambda c: None, None),
        peers.Peer("absent", "absent-pkg", False, missing, lambda c: None, None),
        peers.Peer("broken", "broken", False, broken, lambda c: None, None),
        peers.Peer("present", "present", False, lambda: SimpleNamespace(), lambda c: None, None),
    ]
    usable, notes = peers.available_peers(CPU, fake)
    assert list(usable) == ["present"]
    assert [n.split(":")[0] for n in notes] == ["gpu-only", "absent", "broken"]
    assert "CUDA" in notes[0] and "pip install absent-pkg" in notes[1] and "RuntimeError" in notes[2]


# --- providers and registry ---------------------------------------------------------------------


def test_providers_on_cpu_and_their_filter():
    names = [p.name for p in providers.providers(CPU, peers=False)[0]]
    assert names[:2] == ["eager", "compile"] and "fusedres-cpu" in names
    assert "fusedres-triton" not in names and "fusedres-reference" not in names
    only = [p.name for p in providers.providers(CPU, names=["eager", "fusedres"], peers=False)[0]]
    assert only == ["eager", "fusedres-cpu"]
    assert not providers.providers(CPU, backends=["cuda"], names=["fusedres"], peers=False)[0]


@pytest.mark.parametrize("case_set", registry.SETS)
def test_registry_sets_have_the_op_families_and_unique_labels(case_set):
    for device in (CPU, torch.device("cuda")):
        cases = registry.select_cases(device, case_set)
        assert {"add_norm", "batch_norm"} <= {f for f, _ in cases}
        assert len({c.label for _, c in cases}) == len(cases)


def test_quick_covers_every_op_form():
    labels = [c.label for _, c in registry.select_cases(CPU, "quick")]
    for form in ("add_layer_norm ", "add_layer_norm/prenorm", "add_rms_norm ", "add_rms_norm/prenorm"):
        assert any(label.startswith(form) for label in labels), form
    for form in ("train", "eval"):
        for layout in ("nchw", "cl"):
            assert any(f"/{form} " in label and f" {layout} " in label for label in labels), (form, layout)


def test_cpu_sets_show_half_precision():
    """bf16 rows in --quick and fp16 rows in --full on the CPU, for both families."""
    for case_set, dtypes in (("quick", {torch.bfloat16}), ("full", {torch.bfloat16, torch.float16})):
        cases = registry.select_cases(CPU, case_set)
        for family in ("add_norm", "batch_norm"):
            assert dtypes | {torch.float32} == {c.dtype for f, c in cases if f == family}, (case_set, family)


def test_registry_filters():
    pick = lambda **kw: [c.label for _, c in registry.select_cases(CPU, "quick", **kw)]
    assert all(label.startswith("add_rms_norm") for label in pick(ops=["add_rms_norm"]))
    assert all(label.startswith("bn_add_relu") for label in pick(ops=["batch_norm"]))
    assert all("/eval" in label for label in pick(shapes=["/eval"]))
    both = pick(ops=["add_layer_norm"], dtypes=["bfloat16", "float16"])
    # a dtype filter re-types every case; cases that differed only in dtype collapse into one
    shapes = {label.rsplit(" ", 1)[0] for label in pick(ops=["add_layer_norm"])}
    assert sorted(both) == sorted(f"{s} {d}" for s in shapes for d in ("bfloat16", "float16"))
    assert {label.split()[-1] for label in both} == {"bfloat16", "float16"}


def test_adding_a_family_is_one_entry(monkeypatch):
    import sys

    module = SimpleNamespace(quick_cases=lambda device: [SimpleNamespace(label="model step", op="model")])
    monkeypatch.setitem(sys.modules, "fake_family", module)
    monkeypatch.setitem(registry.FAMILIES, "models", "fake_family")
    assert ("models", "model step") in [(f, c.label) for f, c in registry.select_cases(CPU, "quick")]
    assert not [c for f, c in registry.select_cases(CPU, "smoke") if f == "models"]  # no smoke set


# --- harness ------------------------------------------------------------------------------------


def test_run_case_times_every_provider_and_direction():
    case = NormCase(16, 32, torch.float32, rms_norm=True, prenorm=True)
    provs, _ = providers.providers(CPU, names=["eager", "fusedres"], peers=False)
    result = harness.run_case(case, CPU, provs, harness.TimingOptions(warmup=1, reps=2), family="add_norm")
    assert not result.failures and set(result.parity) == {"eager", "fusedres-cpu"}
    assert {(r["provider"], r["direction"]) for r in result.rows} == {
        (p, d) for p in ("eager", "fusedres-cpu") for d in harness.DIRECTIONS
    }
    row = result.rows[0]
    assert row["family"] == "add_norm" and row["group"] == case.plot_group and row["x"] == 32
    assert row["gbps"] == pytest.approx(row["bytes"] / (row["median_ms"] * 1e-3) / 1e9)


def test_run_case_reports_a_peer_that_cannot_express_the_case():
    case = NormCase(16, 32, torch.float32, rms_norm=True)
    peer = providers.Provider("peer", "peer", lambda c: c.eager(), lambda c: "no such form")
    result = harness.run_case(case, CPU, [peer], harness.TimingOptions(warmup=0, reps=1))
    assert result.notes == ["peer: no such form"] and not result.rows


def test_run_case_counts_a_fusedres_error_in_timing_as_a_failure():
    case = NormCase(16, 32, torch.float32, rms_norm=True)

    def make(c):
        calls = []

        def fn(*inputs):  # right under parity (the first call), then raises
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("launch failed")
            return c.eager()(*inputs)

        return fn

    def broken_make(c):
        raise ImportError("adapter out of date")

    provs = [providers.Provider("fusedres-flaky", "fusedres", make), providers.Provider("peer", "peer", broken_make)]
    result = harness.run_case(case, CPU, provs, harness.TimingOptions(warmup=0, reps=1, directions=("fwd",)))
    assert result.parity["fusedres-flaky"]["pass"] is True and not result.rows
    assert result.failures == [f"{case.label} fusedres-flaky fwd: RuntimeError: launch failed"]
    assert "peer: ImportError: adapter out of date" in result.notes  # a peer's trouble is a note only


class _TokenModelCase:
    """A models-family-like case: token ids in, grads to parameters, no float64 reference and no
    byte model."""

    label, op = "tiny model step", "model"

    def __init__(self):
        self.embedding = torch.nn.Embedding(10, 4)

    def make_inputs(self, device, small=False):
        return [torch.arange(6, device=device).remainder(10)]

    def eager(self):
        return lambda ids: self.embedding(ids).relu()

    fused = eager


def test_run_case_handles_cases_without_reference_bytes_or_float_inputs():
    case = _TokenModelCase()
    provs, _ = providers.providers(CPU, names=["eager", "fusedres"], peers=False)
    result = harness.run_case(case, CPU, provs, harness.TimingOptions(warmup=1, reps=2))
    assert result.parity == {} and not result.failures
    assert len(result.rows) == 2 * len(harness.DIRECTIONS)
    assert all(r["gbps"] is None and r["x"] == case.label for r in result.rows)
    assert case.embedding.weight.grad is not None  # backward reached the parameters
    harness.add_derived(result.rows, copy_gbps=10.0)
    assert "tiny model step" in report.timing_table(result.rows)


def test_make_run_rejects_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        harness.make_run(lambda x: x, [torch.ones(1, requires_grad=True)], "up")


def test_add_derived_speedups_and_copy_share():
    rows = [
        {"case": "c", "direction": "fwd", "provider": p, "median_ms": ms, "gbps": 10.0}
        for p, ms in (("eager", 2.0), ("compile", 1.0), ("fusedres-cpu", 0.5))
    ]
    rows.append({"case": "c", "direction": "fwd", "provider": "model-only", "median_ms": 1.0, "gbps": None})
    harness.add_derived(rows, copy_gbps=20.0)
    assert rows[2]["vs_eager"] == 4.0 and rows[2]["vs_compile"] == 2.0 and rows[2]["pct_copy"] == 50.0
    assert rows[3]["pct_copy"] is None and rows[3]["vs_eager"] == 2.0


# --- reports ------------------------------------------------------------------------------------


def _fake_results():
    rows = [
        {
            "case": case,
            "op": op,
            "group": op,
            "x": x,
            "direction": d,
            "provider": p,
            "median_ms": ms,
            "gbps": 100.0 / ms,
            "peak_mb": None,
            "method": "perf_counter",
        }
        for case, op, x in (("ln 8x1024", "add_layer_norm", 1024), ("ln 8x4096", "add_layer_norm", 4096))
        for d in harness.DIRECTIONS
        for p, ms in (("eager", 2.0), ("fusedres-cpu", 1.0))
    ]
    rows.append({"case": "model step", "op": "model", "direction": "fwd+bwd", "provider": "eager", "median_ms": 9.0})
    harness.add_derived(rows, copy_gbps=200.0)
    parity_rows = [
        {"case": "ln 8x1024", "provider": "eager", "pass": None, "judged": False, "max_abs_error": 1e-3},
        {"case": "ln 8x1024", "provider": "fusedres-cpu", "pass": True, "judged": True, "max_abs_error": 1e-4},
        {"case": "ln 8x1024", "provider": "compile", "pass": False, "judged": False, "max_abs_error": 1e-2},
    ]
    env = {
        "device": "Test GPU",
        "device_type": "cpu",
        "torch": "2.x",
        "copy_gbps": 200.0,
        "timestamp": "2025-01-02T03:04",
    }
    return report.results_dict(env, {"quick": True}, parity_rows, rows, ["liger: needs a CUDA device"], ["p.png"])


def test_terminal_tables_are_readable():
    results = _fake_results()
    table = report.timing_table(results["timings"], "cpu")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["case", "dir", "provider"] and "n/a" in table
    assert sum(line.startswith("ln 8x1024") for line in lines) == 1  # a case's label once, on its block
    assert "2.00x" in table and "50" in table  # speedup, % of copy bandwidth
    parity_table = report.parity_table(results["parity"])
    assert "(yardstick)" in parity_table and " ok" in parity_table and "(outside rule)" in parity_table
    assert "2.00x" in report.summary_table(results["timings"])


def test_json_and_markdown_round_trip(tmp_path):
    results = _fake_results()
    path = tmp_path / "results.json"
    report.write_json(str(path), results)
    assert report.read_json(str(path)) == json.loads(json.dumps(results))
    report.write_markdown(str(tmp_path / "results.md"), results)
    md = (tmp_path / "results.md").read_text()
    for heading in ("# fusedres benchmark: Test GPU, 2025-01-02", "## Parity", "### add_layer_norm", "### model"):
        assert heading in md
    assert "![p](p.png)" in md and "- liger: needs a CUDA device" in md
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(ValueError, match="not a fusedres"):
        report.read_json(str(tmp_path / "other.json"))


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from fusedres.bench import plots

    rows = _fake_results()["timings"]
    written = plots.plots(rows, str(tmp_path), "results", "Test GPU", 200.0)
    assert written == ["results-add-layer-norm.png", "results-model.png"]
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_are_named_by_device_and_date():
    import datetime

    stem = environment.results_stem("NVIDIA H100 80GB HBM3", datetime.date(2025, 3, 4))
    assert stem == "nvidia-h100-80gb-hbm3-2025-03-04"


# --- compare ------------------------------------------------------------------------------------


def test_compare_flags_regressions():
    old = _fake_results()
    new = json.loads(json.dumps(old))
    for r in new["timings"]:
        if r["provider"] == "fusedres-cpu" and r["case"] == "ln 8x4096" and r["direction"] == "bwd":
            r["median_ms"] *= 1.5
        if r["provider"] == "eager" and r["direction"] == "fwd":
            r["median_ms"] *= 0.5
    new["parity"][1]["pass"] = False
    entries = {
        (e["case"], e["direction"], e["provider"]): e for e in compare.compare_rows(old["timings"], new["timings"])
    }
    assert entries[("ln 8x4096", "bwd", "fusedres-cpu")]["flag"] == "REGRESSION"
    assert entries[("ln 8x4096", "bwd", "fusedres-cpu")]["ratio"] == pytest.approx(1.5)
    assert entries[("ln 8x1024", "fwd", "eager")]["flag"] == "faster"
    assert entries[("ln 8x1024", "fwd+bwd", "eager")]["flag"] == ""
    text, count = compare.compare(old, new)
    assert count == 2 and "REGRESSION" in text and "parity passed before, fails now" in text


def test_compare_cli(tmp_path, capsys):
    old = _fake_results()
    new = json.loads(json.dumps(old))
    new["timings"][0]["median_ms"] *= 2
    for name, results in (("old.json", old), ("new.json", new)):
        report.write_json(str(tmp_path / name), results)
    files = [str(tmp_path / "old.json"), str(tmp_path / "new.json")]
    assert cli.main(["--compare", *files]) == 0
    assert "REGRESSION" in capsys.readouterr().out
    assert cli.main(["--compare", *files, "--fail-on-regression"]) == 1


# --- the CLI, end to end on CPU -----------------------------------------------------------------

SMOKE = ["--smoke", "--providers", "eager", "fusedres", "--reps", "2", "--warmup", "1", "--no-progress"]


def test_cli_smoke_run_writes_results(tmp_path, capsys):
    assert cli.main([*SMOKE, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vs eager" in out and "(yardstick)" in out
    files = set(os.listdir(tmp_path))
    assert {"results.json", "results.md"} <= files
    results = report.read_json(str(tmp_path / "results.json"))
    env = results["environment"]
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and env["copy_gbps"] > 0
    labels = {c.label for _, c in registry.select_cases(CPU, "smoke")}
    assert {r["case"] for r in results["timings"]} == labels
    assert all(p["pass"] for p in results["parity"] if p["judged"])
    if _has_matplotlib():
        assert any(f.endswith(".png") for f in files) and set(results["plots"]) <= files


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_fails_when_fusedres_parity_fails(monkeypatch, tmp_path):
    def wrong_fused(self):
        return lambda x, r, w, b: F.layer_norm(x, x.shape[-1:], w, b, self.eps)  # forgets the residual

    monkeypatch.setattr(NormCase, "fused", wrong_fused)
    assert cli.main([*SMOKE, "--ops", "add_layer_norm", "--out", str(tmp_path), "--no-plots"]) == 1
    results = report.read_json(str(tmp_path / "results.json"))
    assert [p["pass"] for p in results["parity"] if p["judged"]] == [False]


def test_cli_names_results_auto_and_rejects_empty_selection(tmp_path):
    args = ["--ops", "batch_norm", "--shapes", "/eval", "--no-plots", "--out", str(tmp_path), "--name", "auto"]
    assert cli.main([*SMOKE, *args]) == 0
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert name.startswith(environment.slug(environment.cpu_name()))
    assert cli.main([*SMOKE, "--shapes", "no-such-shape"]) == 2
