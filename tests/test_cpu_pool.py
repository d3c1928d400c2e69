"""The CPU output pool (csrc/cpu/output_pool.h): large outputs reuse freed blocks, results stay
right, the cap holds, and FUSEDRES_CPU_POOL_MB=0 turns it off."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import fusedres

pytestmark = pytest.mark.skipif(
    fusedres.cpu_pool_stats()["capacity_bytes"] == 0,
    reason="no CPU output pool here (fusedres._C not loaded, torch < 2.11, or FUSEDRES_CPU_POOL_MB=0)",
)

ROWS, HIDDEN = 2048, 1024  # fp32: 8 MiB per output, over the pool's 1 MiB floor


@pytest.fixture(autouse=True)
def empty_pool():
    fusedres.cpu_pool_release()
    yield
    fusedres.cpu_pool_release()


def _inputs(rows=ROWS, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(rows, HIDDEN, generator=gen) for _ in range(2))
    w, b = (torch.randn(HIDDEN, generator=gen) for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (x, r, w, b)]


def test_freed_output_block_is_reused_and_results_stay_right():
    x, r, w, b = _inputs()
    with fusedres.use_backend("cpu"):
        first = fusedres.add_layer_norm(x, r, w, b)
        block = first.data_ptr()
        assert fusedres.cpu_pool_stats()["cached_bytes"] == 0
        del first
        assert fusedres.cpu_pool_stats()["cached_bytes"] >= ROWS * HIDDEN * 4
        x2, r2, _, _ = _inputs(seed=1)  # other values: a stale block must be fully overwritten
        second = fusedres.add_layer_norm(x2, r2, w, b)
    assert second.data_ptr() == block
    assert fusedres.cpu_pool_stats()["cached_bytes"] == 0
    torch.testing.assert_close(second, F.layer_norm(x2 + r2, (HIDDEN,), w, b), rtol=1e-5, atol=1e-5)


def test_small_outputs_come_from_torch():
    x, r, w, b = _inputs(rows=255)  # 1020 KiB: just under the floor
    with fusedres.use_backend("cpu"):
        y = fusedres.add_layer_norm(x, r, w, b)
    del y
    assert fusedres.cpu_pool_stats()["cached_bytes"] == 0


def test_outputs_from_the_floor_up_are_pooled():
    """1 MiB and up (a prenorm forward's 3 MiB y and h at 1024 x 768 took 1.69 ms from torch's
    allocator, 0.33 ms from the pool): a freed output's block serves the next call."""
    x, r, w, b = _inputs(rows=256)  # exactly 1 MiB
    with fusedres.use_backend("cpu"):
        y, h = fusedres.add_layer_norm(x, r, w, b, prenorm=True)
        blocks = {y.data_ptr(), h.data_ptr()}
        del y, h
        assert fusedres.cpu_pool_stats()["cached_bytes"] == 2 * 256 * HIDDEN * 4
        y, h = fusedres.add_layer_norm(x, r, w, b, prenorm=True)
    assert {y.data_ptr(), h.data_ptr()} == blocks
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)


def test_backward_outputs_are_pooled_and_right():
    x, r, w, b = _inputs(requires_grad=True)
    dy = torch.randn(ROWS, HIDDEN)
    expected = torch.autograd.grad(F.layer_norm(x + r, (HIDDEN,), w, b), (x, r, w, b), dy)
    with fusedres.use_backend("cpu"):
        for _step in range(3):  # later steps run on reused blocks
            got = torch.autograd.grad(fusedres.add_layer_norm(x, r, w, b), (x, r, w, b), dy)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
            del got
    assert fusedres.cpu_pool_stats()["cached_bytes"] > 0


def test_channels_last_output_keeps_its_strides():
    x = torch.randn(8, 32, 64, 64).to(memory_format=torch.channels_last)  # 4 MiB
    rm, rv = torch.zeros(32), torch.ones(32)
    with fusedres.use_backend("cpu"):
        for _step in range(2):
            out = fusedres.batch_norm_add_relu(x, x, rm.clone(), rv.clone(), training=True)
            assert out.stride() == x.stride()
            expected = F.relu(F.batch_norm(x, rm.clone(), rv.clone(), training=True) + x)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
            del out


def test_outputs_freed_on_other_threads():
    x, r, w, b = _inputs()
    expected = F.layer_norm(x + r, (HIDDEN,), w, b)
    errors = []

    def work():
        try:
            with fusedres.use_backend("cpu"):
                for _ in range(10):
                    torch.testing.assert_close(fusedres.add_layer_norm(x, r, w, b), expected, rtol=1e-5, atol=1e-5)
        except Exception as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_pooled_output_can_move_to_shared_memory():
    x, r, w, b = _inputs()
    with fusedres.use_backend("cpu"):
        y = fusedres.add_layer_norm(x, r, w, b)
    expected = y.clone()
    y.share_memory_()
    assert y.is_shared()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def _run(code: str, pool_mb: str) -> str:
    env = {**os.environ, "FUSEDRES_CPU_POOL_MB": pool_mb, "FUSEDRES_BACKEND": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


CAP_PROBE = """
import torch, fusedres
x = torch.randn(4096, 1024)
a, b = fusedres.add_layer_norm(x, x), fusedres.add_layer_norm(x, x)  # 16 MiB each
del a, b
s = fusedres.cpu_pool_stats()
print(s["capacity_bytes"], s["cached_bytes"])
"""


@pytest.mark.parametrize(
    "pool_mb,capacity,cached",
    [("0", 0, 0), ("20", 20 << 20, 16 << 20), ("64", 64 << 20, 32 << 20)],
    ids=["off", "one-block-fits", "both-fit"],
)
def test_cap_from_environment(pool_mb, capacity, cached):
    assert _run(CAP_PROBE, pool_mb) == f"{capacity} {cached}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_starts_with_a_fresh_pool():
    """The parent's pool (its lock possibly held by a thread that the child does not have) is not
    the child's: the child's pool is empty, keeps the parent's cap, and works."""
    x, r, w, b = _inputs()
    expected = F.layer_norm(x + r, (HIDDEN,), w, b)
    with fusedres.use_backend("cpu"):
        fusedres.add_layer_norm(x, r, w, b)  # freed at once: the parent's pool holds its block
    parent = fusedres.cpu_pool_stats()
    assert parent["cached_bytes"] > 0
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status, never return into pytest
        code = 1
        try:
            torch.set_num_threads(1)  # the parent's OpenMP threads are gone (as in DataLoader workers)
            child = fusedres.cpu_pool_stats()
            with fusedres.use_backend("cpu"):
                y = fusedres.add_layer_norm(x, r, w, b)
            ok = child == {"capacity_bytes": parent["capacity_bytes"], "cached_bytes": 0}
            code = 0 if ok and torch.allclose(y, expected, rtol=1e-5, atol=1e-5) else 2
        finally:
            os._exit(code)
    for _ in range(600):  # a hung child fails the test instead of hanging it
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    assert os.waitstatus_to_exitcode(status) == 0
    assert fusedres.cpu_pool_stats()["cached_bytes"] == parent["cached_bytes"]  # the parent's is untouched
