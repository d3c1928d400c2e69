"""Model conversion: `fuse(model)` swaps fused Add & Norm / BN + add + ReLU forwards into the
blocks of torchvision ResNets, torch.nn Transformer layers and Hugging Face BERT, RoBERTa, GPT-2,
Llama, Mistral and Qwen2 models; `unfuse(model)` undoes it."""

from fusedres.convert.core import PATTERNS, FuseReport, fuse, unfuse

__all__ = ["PATTERNS", "FuseReport", "fuse", "unfuse"]
