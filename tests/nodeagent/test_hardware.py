"""Hardware detection: /proc/cpuinfo parsing, NVML enumeration, and this real machine."""

from __future__ import annotations

import asyncio
import logging
import platform
import shutil
import socket
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from nodeagent.hardware import (
    Gpu,
    detect,
    detect_async,
    is_apple_silicon,
    nvidia_gpus,
    parse_cpuinfo,
)

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) i9-13900K
flags\t\t: fpu vme

processor\t: 1
model name\t: Intel(R) Core(TM) i9-13900K
"""
PI4_64 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41

Hardware\t: BCM2835
Revision\t: c03114
Serial\t\t: 10000000abcdef01
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""
PI3_32 = """processor\t: 0
model name\t: ARMv7 Processor rev 4 (v7l)
BogoMIPS\t: 38.40

Hardware\t: BCM2835
Revision\t: a02082
Model\t\t: Raspberry Pi 3 Model B Rev 1.2
"""
OLD_ARM = "Processor\t: ARMv6-compatible processor rev 7 (v6l)\nHardware\t: BCM2708\n"


@pytest.mark.parametrize(("text", "name"), [
    (X86, "Intel(R) Core(TM) i9-13900K"),
    (PI4_64, "Raspberry Pi 4 Model B Rev 1.4"),  # the board's Model over its SoC
    (PI3_32, "ARMv7 Processor rev 4 (v7l)"),  # the board comes from the device tree
    (OLD_ARM, "BCM2708"),
    ("model name\t:\nvendor_id\t: x\n", ""),
    ("", ""),
])
def test_parse_cpuinfo(text: str, name: str) -> None:
    assert parse_cpuinfo(text) == name


@pytest.mark.parametrize(("system", "machine", "apple"), [
    ("Darwin", "arm64", True), ("Darwin", "x86_64", False), ("Linux", "arm64", False),
    ("Linux", "aarch64", False),
])
def test_is_apple_silicon(system: str, machine: str, apple: bool) -> None:
    assert is_apple_silicon(system, machine) is apple


class NVMLError(Exception):
    pass


def fake_nvml(names: list[str | bytes], *, fail_on: frozenset[int] = frozenset(),
              init: Callable[[], None] | None = None) -> tuple[types.ModuleType, list[str]]:
    """A stand-in for pynvml (there is no NVIDIA driver here), recording its calls."""
    calls: list[str] = []
    mod = types.ModuleType("pynvml")

    def device(index: int) -> int:
        if index in fail_on:
            raise NVMLError(f"GPU {index} is lost")
        return index

    def memory(handle: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=(handle + 1) * 2**30, free=(handle + 1) * 2**29)

    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
    mod.nvmlInit = init or (lambda: calls.append("init"))  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    mod.nvmlSystemGetDriverVersion = lambda: b"550.54.15"  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(names)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = device  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda handle: names[handle]  # type: ignore[attr-defined]
    return mod, calls


def test_every_nvidia_gpu_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    mod, calls = fake_nvml([b"NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3070"])
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    assert nvidia_gpus() == (
        Gpu(0, "nvidia", "NVIDIA GeForce RTX 3090", 2**30, 2**29, "550.54.15"),
        Gpu(1, "nvidia", "NVIDIA GeForce RTX 3070", 2**31, 2**30, "550.54.15"))
    assert calls == ["init", "shutdown"]


def test_a_failing_gpu_does_not_hide_the_others(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    mod, calls = fake_nvml(["a", "b", "c"], fail_on=frozenset({1}))
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    with caplog.at_level(logging.WARNING, logger="myco.node.hardware"):
        assert [g.name for g in nvidia_gpus()] == ["a", "c"]
    assert "skipping NVIDIA GPU 1: GPU 1 is lost" in caplog.text
    assert calls == ["init", "shutdown"]


def test_no_driver_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    def init() -> None:
        raise NVMLError("NVML Shared Library Not Found")

    mod, calls = fake_nvml(["a"], init=init)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    assert nvidia_gpus() == ()
    assert calls == []  # no shutdown without a successful init
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    assert nvidia_gpus() == ()


def _has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def test_detect_on_this_machine() -> None:
    hw = detect()
    print(hw)
    assert hw.cpu_cores >= hw.cpu_physical_cores >= 1
    assert 0 < hw.ram_available <= hw.ram_total
    assert (hw.hostname, hw.system, hw.machine) == \
        (socket.gethostname(), platform.system(), platform.machine())
    if hw.system == "Linux":
        assert hw.cpu_model == (parse_cpuinfo(Path("/proc/cpuinfo").read_text())
                                or platform.processor() or platform.machine())
    if _has_nvidia_gpu():
        assert hw.gpus and all(g.vendor == "nvidia" and g.memory_total > 0 for g in hw.gpus)
    else:
        assert hw.gpus == ()  # no driver or no GPU is the normal case, not an error
    assert hw.unified_memory is is_apple_silicon(hw.system, hw.machine)


def test_detect_async_runs_detect() -> None:
    hw, sync = asyncio.run(detect_async()), detect()
    assert (hw.hostname, hw.cpu_model, hw.ram_total, hw.gpus != ()) == \
        (sync.hostname, sync.cpu_model, sync.ram_total, sync.gpus != ())
