"""The benchmark suite: parity against float64 and speed against eager PyTorch, torch.compile and
peer libraries. Run `python -m fusedres.bench --help`.

cli.py          the command line: select, run, print, write
registry.py     the op families and their case sets (smoke, quick, full) and filters
add_norm.py     Add & LayerNorm / RMSNorm cases      batch_norm.py   BatchNorm + add + ReLU cases
byte_model.py   bytes each op must move (GB/s)       providers.py    eager, compile, fusedres-<backend>
peers.py        liger-kernel, flash-attn, apex        harness.py      one case through parity and timing
parity.py       errors vs float64 and the rule       timing.py       medians: CUDA events/graphs, perf_counter
report.py       tables, results.md, results.json     plots.py        PNGs (matplotlib, optional)
compare.py      regression table of two runs         environment.py  device, versions, commit
"""
