"""The memory's update rule.

- `naive.py`: the reference, a plain loop over tokens;
- `chunking.py`: the chunked recurrence every path shares (update terms, the loop over chunks,
  refresh spans);
- `closed_form.py` and `functional.py`: two ways to get a chunk's per-token gradient sums, in
  closed form for the built-in networks, through `torch.func` for any other;
- `fused.py` and `dual.py`: the built-in networks' chunk loops, their backward written out (the
  state after every chunk, or in dual form once per block); `residual_norm_triton.py`: the
  residual norm's step in the fused loop as one Triton kernel each way, on CUDA;
- `scan.py`: first-order scans for refresh spans.
"""

from __future__ import annotations

from .closed_form import ClosedFormNetwork
from .functional import TorchFuncNetwork


def network_for(model):
    """How `model`'s gradients are computed: in closed form when it is a built-in network
    (`LinearMemory`, `MemoryMLP`, `ResidualNormMemory`), else through `torch.func`."""
    return ClosedFormNetwork.of(model) or TorchFuncNetwork(model)
