"""Peer libraries timed beside fusedres when installed (never required): liger-kernel,
flash-attn's Triton layer_norm_fn, apex's fused norms.

Each adapter maps an Add & Norm case (LayerNorm or RMSNorm of x + residual, prenorm, fp32
residual stream) onto the peer's API the way a user adopting the peer would write it: where
the peer has no fused add, the add stays an eager `x + residual` in front of its norm. A peer
that cannot express a case says why (`supports`), and the bench reports that once.

`load` imports the peer and returns the handful of functions the adapter calls, so the mapping
(`supports`, `build`) is testable with fakes on machines without the peer or a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch


@dataclass(frozen=True)
class Peer:
    name: str  # the provider name in tables
    package: str  # what to install
    needs_cuda: bool
    load: Callable[[], SimpleNamespace]
    supports: Callable[[object], str | None]  # None, or why the case is out of reach
    build: Callable[[SimpleNamespace, object], Callable]  # fn(x, residual, weight, bias)


def _is_add_norm(case) -> bool:
    return all(hasattr(case, a) for a in ("rms_norm", "prenorm", "residual_in_fp32", "eps"))


def _add_norm_only(case) -> str | None:
    return None if _is_add_norm(case) else "no kernel for this op"


def _no_fp32_residual(case) -> str | None:
    if not _is_add_norm(case):
        return "no kernel for this op"
    return "no fp32 residual stream beside low-precision activations" if case.residual_in_fp32 else None


def _with_h(case, y, h):
    return (y, h) if case.prenorm else y


# --- liger-kernel ------------------------------------------------------------------------------


def _load_liger() -> SimpleNamespace:
    from liger_kernel.transformers.functional import liger_fused_add_rms_norm, liger_layer_norm

    return SimpleNamespace(layer_norm=liger_layer_norm, fused_add_rms_norm=liger_fused_add_rms_norm)


def _build_liger(api, case):
    if case.rms_norm:
        # casting_mode "gemma" with offset 0 computes x * rstd * weight in fp32 and rounds once,
        # as F.rms_norm does ("llama" rounds x * rstd before the weight). in_place=False: the
        # default overwrites the incoming grad, which the bench reuses across timed backwards.
        def rms(x, residual, weight, bias):
            y, h = api.fused_add_rms_norm(x, residual, weight, case.eps, 0.0, "gemma", False)
            return _with_h(case, y, h)

        return rms

    def layer(x, residual, weight, bias):
        h = x + residual
        return _with_h(case, api.layer_norm(h, weight, bias, case.eps), h)

    return layer


# --- flash-attn ---------------------------------------------------------------------------------


def _load_flash_attn() -> SimpleNamespace:
    # Only the Triton module: flash-attn installed with FLASH_ATTENTION_SKIP_CUDA_BUILD has it.
    from flash_attn.ops.triton.layer_norm import layer_norm_fn

    return SimpleNamespace(layer_norm_fn=layer_norm_fn)


def _build_flash_attn(api, case):
    # One call expresses every case: with a residual, its residual_out (our h) takes the
    # residual's dtype, so an fp32 residual stream is an fp32 residual tensor, as here.
    def fn(x, residual, weight, bias):
        return api.layer_norm_fn(
            x,
            weight,
            bias,
            residual=residual,
            eps=case.eps,
            prenorm=case.prenorm,
            residual_in_fp32=case.residual_in_fp32,
            is_rms_norm=case.rms_norm,
        )

    return fn


# --- apex ---------------------------------------------------------------------------------------


def _load_apex() -> SimpleNamespace:
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine

    return SimpleNamespace(layer_norm=fused_layer_norm_affine, rms_norm=fused_rms_norm_affine)


def _build_apex(api, case):
    def fn(x, residual, weight, bias):
        h = x + residual
        shape = (h.shape[-1],)
        if case.rms_norm:
            y = api.rms_norm(h, weight, shape, case.eps)
        else:
            y = api.layer_norm(h, weight, bias, shape, case.eps)
        return _with_h(case, y, h)

    return fn


PEERS = (
    Peer("liger", "liger-kernel", True, _load_liger, _no_fp32_residual, _build_liger),
    Peer("flash-attn", "flash-attn", True, _load_flash_attn, _add_norm_only, _build_flash_attn),
    Peer("apex", "apex", True, _load_apex, _no_fp32_residual, _build_apex),
)


def available_peers(device: torch.device, peers=PEERS) -> tuple[dict[str, tuple[Peer, SimpleNamespace]], list[str]]:
    """The peers that import and can run on `device` ({name: (peer, api)}), and a note for each
    one that cannot."""
    usable, notes = {}, []
    for peer in peers:
        if peer.needs_cuda and device.type != "cuda":
            notes.append(f"{peer.name}: needs a CUDA device, not run")
            continue
        try:
            usable[peer.name] = (peer, peer.load())
        except ImportError as e:
            notes.append(f"{peer.name}: not installed (pip install {peer.package}; {e})")
        except Exception as e:  # a broken install should not stop the bench
            notes.append(f"{peer.name}: failed to import ({type(e).__name__}: {e})")
    return usable, notes
