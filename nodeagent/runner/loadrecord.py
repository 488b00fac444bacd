"""The load record: which device holds which layers, read from llama.cpp's own load log.

A runner installs `LogCapture` (llama.cpp's `llama_log_set`) before loading, `parse`s what was
logged into a `LoadRecord`, and `check`s it against the split it asked for.  The lines read:

    llama_prepare_model_devices: using device RPC0 (127.0.0.1:50052) (unknown id) - 24105 MiB free
    load_tensors: layer   7 assigned to device RPC0, is_swa = 1
    load_tensors: RPC0[127.0.0.1:50052] model buffer size =    21.34 MiB
    llama_kv_cache: RPC0[127.0.0.1:50052] KV buffer size =     2.50 MiB
    sched_reserve: RPC0[127.0.0.1:50052] compute buffer size =    18.51 MiB

A remote buffer is named after the worker's own device index and endpoint ("RPC0[host:port]"
on every worker), so buffers are matched to devices by endpoint.  Host-side buffers
(CPU_Mapped, CPU_REPACK, CUDA_Host) count for the CPU.  Sizes are MiB with two decimals.
"""

from __future__ import annotations

import ctypes
import re
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from myco.layers import CPU, assign_layers

_USING = re.compile(r"using device (\S+) \((.*)\) \([^()]*\) - \d+ MiB free")
_ASSIGNED = re.compile(r"layer\s+(\d+) assigned to device ([^,\s]+)")
_BUFFER = re.compile(r"(\S+) (model|KV|compute) buffer size =\s*([\d.]+) MiB")
_REMOTE = re.compile(r"RPC(\d+)\[(.+)\]")
_WARN, _CONT = 3, 5  # ggml_log_level: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


class DeviceLoad(msgspec.Struct, frozen=True):
    name: str  # CPU, RPC0, CUDA0, ...
    description: str  # an RPC device's worker host:port; "" for the CPU
    layers: tuple[int, ...]  # unit indices; the output layer is unit n_layers
    weights_bytes: int = 0
    kv_bytes: int = 0
    compute_bytes: int = 0


class LoadRecord(msgspec.Struct, frozen=True):
    n_layers: int  # repeating layers
    devices: tuple[DeviceLoad, ...]  # the CPU first, then llama.cpp's device order
    n_gpu_layers: int
    tensor_split: tuple[float, ...]
    load_seconds: float


class LogCapture:
    """Keeps llama.cpp's log text while `recording`; always passes warnings and errors on to
    stderr (as llama-cpp-python's own callback does when not verbose)."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.recording = True
        self._last_level = 0
        self._callback: Any = None  # the ctypes thunk must outlive its registration

    def install(self) -> None:
        import llama_cpp

        def on_log(level: int, text: bytes | None, _: Any) -> None:
            chunk = (text or b"").decode("utf-8", errors="replace")
            self._last_level = self._last_level if level == _CONT else level
            if self.recording:
                self.chunks.append(chunk)
            if self._last_level >= _WARN:
                print(chunk, end="", file=sys.stderr, flush=True)

        self._callback = llama_cpp.llama_log_callback(on_log)
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def parse(text: str, *, n_gpu_layers: int, tensor_split: Sequence[float],
          load_seconds: float) -> LoadRecord:
    """The record of one load, from the log text of that load alone."""
    devices: dict[str, str] = {"CPU": ""}
    layers: dict[str, list[int]] = {"CPU": []}
    sizes: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        if m := _USING.search(line):
            devices[m[1]], layers[m[1]] = m[2], []
        elif m := _ASSIGNED.search(line):
            layers.setdefault(m[2], []).append(int(m[1]))
        elif m := _BUFFER.search(line):
            per_kind = sizes.setdefault(_owner(m[1], devices), {})
            per_kind[m[2]] = per_kind.get(m[2], 0) + round(float(m[3]) * 2**20)
    n_units = sum(len(v) for v in layers.values())
    out = tuple(DeviceLoad(name, devices.get(name, "?"), tuple(layers.get(name, ())),
                           *(sizes.get(name, {}).get(k, 0) for k in ("model", "KV", "compute")))
                for name in dict.fromkeys([*devices, *layers]))
    return LoadRecord(max(n_units - 1, 0), out, n_gpu_layers, tuple(tensor_split), load_seconds)


def _owner(buffer: str, devices: dict[str, str]) -> str:
    if m := _REMOTE.fullmatch(buffer):
        same = [name for name, where in devices.items() if where == m[2]]
        if int(m[1]) < len(same):
            return same[int(m[1])]
    return buffer if buffer in devices else "CPU"


def span(units: Sequence[int], n_layers: int) -> str:
    """Units as text: "layers 0-6", "layers 13-17 + output", "the output layer", "no layers"."""
    repeating = [u for u in units if u < n_layers]
    text = f"layers {repeating[0]}-{repeating[-1]}" if repeating else ""
    if n_layers in units:
        text = f"{text} + output" if text else "the output layer"
    return text or "no layers"


def check(record: LoadRecord, endpoints: Sequence[str]) -> list[str]:
    """Why the load differs from the split asked for (empty: as planned): the RPC devices must
    be the workers registered, in order; each must hold layers; each device must hold exactly
    the layers that n_gpu_layers and tensor_split give it."""
    if not any(d.layers for d in record.devices):
        return ["llama.cpp logged no layer assignments"]
    problems = []
    remote = [d.description for d in record.devices if d.name.startswith("RPC")]
    if remote != list(endpoints):
        problems.append(f"llama.cpp uses RPC devices at {remote}, the runner registered "
                        f"{list(endpoints)}")
    try:
        planned = assign_layers(record.n_layers, record.n_gpu_layers, record.tensor_split,
                                len(record.devices) - 1)
    except ValueError as exc:
        return [*problems, str(exc)]
    for index, device in enumerate(record.devices, start=CPU):
        want = tuple(u for u, k in enumerate(planned) if k == index)
        label = f"{device.name} ({device.description})" if device.description else device.name
        if device.layers != want:
            problems.append(f"{label} holds {span(device.layers, record.n_layers)}, "
                            f"planned {span(want, record.n_layers)}")
        elif device.description in endpoints and not want:
            problems.append(f"{label} holds no layers")
    return problems
