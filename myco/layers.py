"""How llama.cpp maps `n_gpu_layers` and `tensor_split` to layers per device, both ways.

Pure arithmetic, a port of `load_tensors` in llama.cpp's src/llama-model.cpp (the copy vendored in
llama-cpp-python 0.3.36).  A model with N repeating layers has N + 1 units: layers 0..N-1 and
the output layer as unit N (the load log calls it "layer N").  The token embedding (the input)
always stays on the CPU and is not a unit.

- The first N + 1 - n_gpu_layers units go to the CPU (n_gpu_layers < 0 means N + 1);
  the last n_gpu_layers units (so the output first) are offloaded.
- Offloaded unit j (0-based among them) goes to the first device k whose cumulative share
  (tensor_split[0] + ... + tensor_split[k]) / sum, in float32, is > j / n_gpu_layers.
  With integer shares that sum to n_gpu_layers, device k gets exactly tensor_split[k] units.
- Devices are in llama.cpp's order: RPC devices (RPC0, RPC1, ... in registration order), then
  the local GPUs.  The CPU is never in tensor_split.  A share of 0 gives a device nothing.
- An all-zero (or no) tensor_split with n_gpu_layers > 0 splits by free memory (unpredictable).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence
from itertools import accumulate

CPU = -1  # the device index `assign_layers` uses for the CPU


def _f32(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


def layer_split(shares: Sequence[int]) -> tuple[int, tuple[float, ...]]:
    """(n_gpu_layers, tensor_split) that put shares[0] units on the CPU (the first ones), then
    shares[1] on device 0, shares[2] on device 1, ...; units count the output layer as the last.
    ValueError on an empty or negative share list."""
    if not shares or any(s < 0 for s in shares):
        raise ValueError(f"shares must be counts >= 0, CPU first: {list(shares)}")
    n_gpu_layers = sum(shares[1:])
    return n_gpu_layers, tuple(float(s) for s in shares[1:]) if n_gpu_layers else ()


def assign_layers(n_layers: int, n_gpu_layers: int, tensor_split: Sequence[float],
                  n_devices: int) -> tuple[int, ...]:
    """The device index (CPU = -1) of each of the n_layers + 1 units, as llama.cpp assigns them.
    `tensor_split` is padded with zeros (or cut) to `n_devices`, as llama.cpp reads it.
    ValueError when the split would follow free memory (all-zero split with layers to offload)."""
    units = n_layers + 1
    ngl = units if n_gpu_layers < 0 else n_gpu_layers
    start = max(units - ngl, 0)
    active = min(ngl, units) if n_devices else 0
    split = [*tensor_split[:n_devices], *[0.0] * (n_devices - len(tensor_split))]
    if active and not any(split):
        raise ValueError("no tensor_split: llama.cpp would split by free memory")
    cumulative = list(accumulate(split, lambda total, s: _f32(total + _f32(s)), initial=0.0))[1:]
    cumulative = [_f32(c / cumulative[-1]) for c in cumulative] if active else cumulative
    return tuple(CPU if unit < start or unit - start >= active else
                 bisect.bisect_right(cumulative, _f32(_f32(unit - start) / _f32(active)))
                 for unit in range(units))


def layer_shares(n_layers: int, n_gpu_layers: int, tensor_split: Sequence[float],
                 n_devices: int) -> tuple[int, ...]:
    """The inverse of `layer_split`: units on the CPU, then on each of the `n_devices`."""
    assigned = assign_layers(n_layers, n_gpu_layers, tensor_split, n_devices)
    return (assigned.count(CPU), *(assigned.count(k) for k in range(n_devices)))
