"""Hardware detection: CPU, RAM, every NVIDIA GPU (NVML), Apple Silicon unified memory, boards.

`detect()` is synchronous and does blocking calls (NVML, /proc, sysctl): run it off the event
loop, or await `detect_async()`.  A machine without NVML (no driver, no GPU, a Pi, a Mac) is the
normal case: no GPUs, not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import socket
import subprocess
from pathlib import Path
from typing import Literal

import msgspec
import psutil

log = logging.getLogger("myco.node.hardware")


class Gpu(msgspec.Struct, frozen=True):
    index: int
    vendor: Literal["nvidia", "apple"]
    name: str
    memory_total: int
    memory_free: int
    driver: str


class Hardware(msgspec.Struct, frozen=True):
    hostname: str
    system: str  # platform.system()
    machine: str  # platform.machine()
    cpu_model: str
    cpu_cores: int  # logical
    cpu_physical_cores: int
    ram_total: int
    ram_available: int
    gpus: tuple[Gpu, ...]
    unified_memory: bool  # Apple Silicon: the GPU shares RAM
    board: str | None  # e.g. "Raspberry Pi 4 Model B Rev 1.4"


def parse_cpuinfo(text: str) -> str:
    """The CPU's name from /proc/cpuinfo: x86 "model name", ARM "Model" or "Hardware"."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip(), value.strip())
    return next((fields[k] for k in ("model name", "Model", "Hardware", "cpu model", "Processor")
                 if k in fields), "")


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def nvidia_gpus() -> tuple[Gpu, ...]:
    """Every NVIDIA GPU NVML sees, not only the first; () when NVML or a driver is missing."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except ImportError:
        return ()
    except pynvml.NVMLError:
        return ()
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                name = _text(pynvml.nvmlDeviceGetName(handle))
            except pynvml.NVMLError as exc:  # one GPU in a bad state must not hide the others
                log.warning("skipping NVIDIA GPU %d: %s", index, exc)
                continue
            gpus.append(Gpu(index, "nvidia", name, int(memory.total), int(memory.free), driver))
        return tuple(gpus)
    except pynvml.NVMLError as exc:
        log.warning("NVML is loaded but failed: %s", exc)
        return ()
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _cpu_model(system: str) -> str:
    if system == "Linux":
        with contextlib.suppress(OSError):
            if name := parse_cpuinfo(Path("/proc/cpuinfo").read_text()):
                return name
    if system == "Darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], text=True,
                                  capture_output=True, timeout=5).stdout.strip()
    return platform.processor() or platform.machine()


def _board() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/device-tree/model").read_text().strip("\x00\n ") or None
    return None


def is_apple_silicon(system: str, machine: str) -> bool:
    """An Apple Silicon Mac, whose GPU shares RAM.  (Python under Rosetta reports x86_64.)"""
    return system == "Darwin" and machine == "arm64"


def detect() -> Hardware:
    """A snapshot of this machine; blocking (NVML, /proc, sysctl), so call it off the loop."""
    system, machine = platform.system(), platform.machine()
    memory = psutil.virtual_memory()
    cpu, apple = _cpu_model(system), is_apple_silicon(system, machine)
    gpus = (Gpu(0, "apple", cpu, memory.total, memory.available, "metal"),) if apple \
        else nvidia_gpus()
    return Hardware(
        hostname=socket.gethostname(), system=system, machine=machine, cpu_model=cpu,
        cpu_cores=psutil.cpu_count(logical=True) or 1, ram_total=memory.total,
        cpu_physical_cores=psutil.cpu_count(logical=False) or 1, ram_available=memory.available,
        gpus=gpus, unified_memory=apple, board=_board())


def default_threads() -> int:
    """llama.cpp's own choice of threads for this machine: its physical cores."""
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def default_slots(hw: Hardware) -> int:
    """Requests a loaded model decodes at once: 4, as llama.cpp's server; 2 under 8 GiB."""
    return 4 if hw.gpus or hw.ram_total >= 8 * 2**30 else 2


async def detect_async() -> Hardware:
    return await asyncio.to_thread(detect)
