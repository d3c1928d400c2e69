"""The benchmark suite: parity against float64 and speed against eager PyTorch and torch.compile.

Run `python -m fusedres.bench --help`.
"""
