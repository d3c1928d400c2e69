"""scripts/gpu_check.sh: the output limits of a borrowed GPU machine (at most 8 files, at most 2
folders down, plain names), the packing into them, the compute-sanitizer verdicts and the step
budget, each run alone by sourcing the script; and a short --dry-run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def bash(code: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`code` after sourcing the script (which defines its functions and runs nothing)."""
    return subprocess.run(
        ["bash", "-c", f"source {SCRIPT}; {code}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def check(out: Path) -> subprocess.CompletedProcess:
    return bash(f"check_out_limits {out}")


# --- check_out_limits ---------------------------------------------------------------------------


def test_eight_files_two_folders_down_pass(tmp_path):
    for i in range(6):
        write(tmp_path / f"f{i}.md")
    write(tmp_path / "a" / "b" / "deep.json")
    write(tmp_path / "a" / "x.png")
    done = check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok (8 files" in done.stdout


def test_a_ninth_file_fails(tmp_path):
    for i in range(9):
        write(tmp_path / f"f{i}.log")
    done = check(tmp_path)
    assert done.returncode == 1 and "9 files, more than 8" in done.stdout


def test_three_folders_down_fails(tmp_path):
    write(tmp_path / "a" / "b" / "c" / "lost.txt")
    done = check(tmp_path)
    assert done.returncode == 1 and "more than 2 folders down" in done.stdout


@pytest.mark.parametrize("name", ["with space.md", "résumé.md", "a:b.md"])
def test_odd_names_fail(tmp_path, name):
    write(tmp_path / name)
    done = check(tmp_path)
    assert done.returncode == 1 and "a name with characters" in done.stdout


def test_links_fail(tmp_path):
    target = write(tmp_path / "real.md")
    (tmp_path / "link.md").symlink_to(target)
    done = check(tmp_path)
    assert done.returncode == 1 and "not a plain file" in done.stdout


def test_a_file_over_16_mib_fails(tmp_path):
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(17 * 2**20)
    done = check(tmp_path)
    assert done.returncode == 1 and "over 16 MiB" in done.stdout


# --- pack_outputs -------------------------------------------------------------------------------


def test_pack_keeps_the_readable_files_on_top_and_tars_the_rest(tmp_path):
    stage, out = tmp_path / "stage", tmp_path / "out"
    write(stage / "summary.md", "| step |")
    write(stage / "bench" / "results.json", "{}")
    write(stage / "bench" / "results.md", "# bench")
    for step, groups in (("bench-add-norm", "ab"), ("bench-bn", "cd")):
        for group in groups:
            write(stage / "bench" / f"results-{group}.png")
            write(stage / step / f"results-{group}.png")
    write(stage / "overhead" / "results-overhead.md", "# overhead")
    write(stage / "overhead" / "results-overhead.json", "{}")
    for i in range(20):
        write(stage / "logs" / f"step{i}.log", "log")
    write(stage / "junit-gpu-tests.xml", "<testsuites/>")
    write(stage / "site" / "fusedres" / "__init__.py")  # the pip target: not packed
    write(out / "old-foreign-file.txt")  # not ours: kept, and counted

    done = bash(f"pack_outputs {stage} {out} && check_out_limits {out}")
    assert done.returncode == 0, done.stdout + done.stderr
    top = sorted(p.name for p in out.iterdir())
    assert top == [
        "logs.tar.gz",
        "old-foreign-file.txt",
        "overhead.md",
        "results-a.png",
        "results-c.png",
        "results.json",
        "results.md",
        "summary.md",
    ]
    with tarfile.open(out / "logs.tar.gz") as tar:
        packed = {os.path.normpath(n) for n in tar.getnames()}
    assert {"logs/step19.log", "junit-gpu-tests.xml", "bench/results-d.png", "overhead/results-overhead.json"} <= packed
    assert not any(n.startswith("site") for n in packed)

    write(out / "one-too-many.txt")
    assert check(out).returncode == 1


def test_pack_without_bench_results(tmp_path):
    """A run whose bench steps failed still writes the summary and the logs."""
    stage, out = tmp_path / "stage", tmp_path / "out"
    write(stage / "summary.md")
    write(stage / "logs" / "env.log")
    done = bash(f"pack_outputs {stage} {out}")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.md"]


# --- compute-sanitizer verdicts and step details -----------------------------------------------


@pytest.mark.parametrize(
    "log, rc, status, line",
    [
        ("========= COMPUTE-SANITIZER\n========= Error: Device not supported\n", 1, 77, "skip: "),
        ("25 passed in 40.1s\n========= ERROR SUMMARY: 0 errors\n", 0, 0, "ok: "),
        ("========= Invalid __global__ write of size 4\n========= ERROR SUMMARY: 3 errors\n", 1, 1, "fail: "),
        ("2 failed, 23 passed in 40.1s\n========= ERROR SUMMARY: 0 errors\n", 1, 1, "fail: exit code 1"),
    ],
    ids=["refused", "clean", "errors", "tests-failed"],
)
def test_sanitizer_verdict(tmp_path, log, rc, status, line):
    path = write(tmp_path / "sanitizer.log", log)
    done = bash(f"sanitizer_verdict {path} {rc}")
    assert done.returncode == status, done.stdout + done.stderr
    assert done.stdout.startswith(line), done.stdout


def test_step_detail_prefers_pytest_counts_and_adds_a_verdict(tmp_path):
    text = "..\n== 3 failed, 40 passed, 2 skipped in 9.1s ==\nother | noise\nskip: no device\n"
    log = write(tmp_path / "a.log", text)
    assert bash(f"step_detail {log}").stdout.strip() == "3 failed, 40 passed, 2 skipped in 9.1s; skip: no device"
    log = write(tmp_path / "b.log", "first\nlast | line\n\n")
    assert bash(f"step_detail {log}").stdout.strip() == "last \\| line"


# --- the script as a whole ----------------------------------------------------------------------


def run_script(tmp_path, *args, env=None, timeout=600):
    env = {
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "WHEELS": str(tmp_path / "no-wheels"),
        "TMPDIR": str(tmp_path),
        **(env or {}),
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
    )


def test_unknown_arguments_and_steps_are_refused(tmp_path):
    assert run_script(tmp_path, "--steps", "env,nonsense").returncode == 64
    assert run_script(tmp_path, "--fast").returncode == 64


def test_steps_past_the_budget_are_reported_not_run(tmp_path):
    done = run_script(tmp_path, "--dry-run", "--steps", "env,memcheck,racecheck", env={"GPU_CHECK_BUDGET": "40"})
    summary = (tmp_path / "out" / "summary.md").read_text()
    # env gets what the two later steps leave (15 s each in reserve); they find the budget spent
    # only if env used it, so each is either run or marked "no time", never silently dropped.
    for step in ("env", "memcheck", "racecheck"):
        assert f"| {step} |" in summary, summary
    assert "output limits: ok" in done.stdout, done.stdout + done.stderr


def test_dry_run_writes_the_files_within_the_limits(tmp_path):
    """Every step in its CPU form (about a minute on two cores): the same files as on a GPU."""
    done = run_script(tmp_path, "--dry-run")
    out = tmp_path / "out"
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    plots = {f for f in files if f.endswith(".png")}
    assert files - plots == {"summary.md", "results.json", "results.md", "overhead.md", "logs.tar.gz"}
    assert len(plots) <= 2  # none without matplotlib
    summary = (out / "summary.md").read_text()
    for step in ("install", "env", "gpu-tests", "cuda-graphs", "triton-launchers", "bench-add-norm", "bench-bn"):
        assert f"| {step} | ok |" in summary, summary
    for step in ("overhead", "memcheck", "racecheck"):
        assert f"| {step} | ok |" in summary, summary
    assert "skipped" in summary  # cuda-graphs: every test needs a GPU
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == 1 and {r["op"] for r in results["timings"]} >= {"add_layer_norm", "batch_norm_add_relu"}
    assert "output limits: ok" in done.stdout
    assert not list(tmp_path.glob("gpu_check.*")), "the work folder was left behind"
