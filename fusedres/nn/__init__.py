"""Drop-in modules: same parameters, buffers and state_dict keys as the torch modules they replace."""

from fusedres.nn.add_norm import AddLayerNorm, AddRMSNorm
from fusedres.nn.batch_norm import (
    BatchNormAddReLU1d,
    BatchNormAddReLU2d,
    BatchNormAddReLU3d,
    ConvBNAddReLU2d,
    ConvBNReLU2d,
    SyncBatchNorm2d,
    SyncBatchNormAddReLU2d,
    convert_sync_batchnorm,
    drop_path_rowscale,
)

__all__ = [
    "AddLayerNorm",
    "AddRMSNorm",
    "BatchNormAddReLU1d",
    "BatchNormAddReLU2d",
    "BatchNormAddReLU3d",
    "ConvBNAddReLU2d",
    "ConvBNReLU2d",
    "SyncBatchNorm2d",
    "SyncBatchNormAddReLU2d",
    "convert_sync_batchnorm",
    "drop_path_rowscale",
]
