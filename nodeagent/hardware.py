"""Hardware detection: CPU, RAM, every NVIDIA GPU (NVML), Apple Silicon unified memory, boards.

`detect()` is synchronous and does blocking calls (NVML, /proc, sysctl): run it off the event
loop.  A machine without NVML (no driver, no GPU, a Pi, a Mac) is the normal case: no GPUs.
"""

from __future__ import annotations

import platform
import socket
import subprocess
from pathlib import Path
from typing import Literal

import msgspec
import psutil


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
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        if key in fields:
            return fields[key]
    return ""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def nvidia_gpus() -> tuple[Gpu, ...]:
    """Every NVIDIA GPU NVML sees; () when NVML or a driver is missing."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return ()
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(Gpu(index, "nvidia", _text(pynvml.nvmlDeviceGetName(handle)),
                            int(memory.total), int(memory.free), driver))
        return tuple(gpus)
    except pynvml.NVMLError:
        return ()
    finally:
        pynvml.nvmlShutdown()


def _cpu_model(system: str) -> str:
    if system == "Linux":
        try:
            name = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
        except OSError:
            name = ""
        if name:
            return name
    if system == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], text=True,
                                  capture_output=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _board() -> str | None:
    try:
        return Path("/proc/device-tree/model").read_text().strip("\x00\n ") or None
    except OSError:
        return None


def detect() -> Hardware:
    system, machine = platform.system(), platform.machine()
    memory = psutil.virtual_memory()
    cpu = _cpu_model(system)
    apple = system == "Darwin" and machine == "arm64"
    gpus = (Gpu(0, "apple", cpu, memory.total, memory.available, "metal"),) if apple \
        else nvidia_gpus()
    return Hardware(
        hostname=socket.gethostname(), system=system, machine=machine, cpu_model=cpu,
        cpu_cores=psutil.cpu_count(logical=True) or 1,
        cpu_physical_cores=psutil.cpu_count(logical=False) or 1,
        ram_total=memory.total, ram_available=memory.available, gpus=gpus,
        unified_memory=apple, board=_board())
