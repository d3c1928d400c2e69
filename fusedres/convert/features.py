"""Which residual features the fused Add & Norm ops take: the one place fuse() asks.

Issue 23 adds `dropout_p`, `rowscale`, `colscale` and `weight_offset` keywords to
fusedres.add_layer_norm / add_rms_norm. fuse() folds a branch's dropout, drop path (rowscale),
LayerScale or scalar multiplier (colscale) into the fused call when the op takes the keyword,
and otherwise leaves that op to torch in front of the fused add & norm. A norm computing
`(1 + w) * x_hat` (Gemma) cannot be fused at all without `weight_offset`.
"""

from __future__ import annotations

import functools
import inspect

DROPOUT, ROWSCALE, COLSCALE, WEIGHT_OFFSET = "dropout_p", "rowscale", "colscale", "weight_offset"
FEATURES = (DROPOUT, ROWSCALE, COLSCALE, WEIGHT_OFFSET)


@functools.cache
def supported(feature: str) -> bool:
    """Whether both add_layer_norm and add_rms_norm take the keyword `feature`."""
    from fusedres.ops import add_norm

    return all(feature in inspect.signature(f).parameters for f in (add_norm.add_layer_norm, add_norm.add_rms_norm))


def unsupported_reason(feature: str) -> str:
    return f"needs {feature} (fusedres does not support it yet)"
