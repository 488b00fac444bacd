"""Capability: which models fit where, and the node's role, over real-world machine profiles."""

from __future__ import annotations

import pytest

from nodeagent.capability import GiB, classify, kv_cache_bytes
from nodeagent.hardware import Gpu, Hardware
from nodeagent.store import ModelMeta

MiB = 1024**2


def make_gpu(free_gb: float, total_gb: float = 24, name: str = "NVIDIA GeForce RTX 3090",
             index: int = 0) -> Gpu:
    return Gpu(index, "nvidia", name, int(total_gb * GiB), int(free_gb * GiB), "550.54.15")


def make_hw(ram_gb: float, *, available_gb: float | None = None, gpus: tuple[Gpu, ...] = (),
            apple: bool = False, machine: str = "x86_64", board: str | None = None,
            cpu: str = "cpu") -> Hardware:
    ram = int(ram_gb * GiB)
    available = ram if available_gb is None else int(available_gb * GiB)
    if apple:
        gpus = (Gpu(0, "apple", cpu, ram, available, "metal"),)
    return Hardware("host", "Darwin" if apple else "Linux", "arm64" if apple else machine, cpu,
                    8, 4, ram, available, gpus, apple, board)


def make_model(model_id: str, size_bytes: int, layers: int, kv_heads: int, head_dim: int,
               ctx: int = 32768) -> ModelMeta:
    return ModelMeta(model_id, f"/models/{model_id}.gguf", "llama", size_bytes, layers, ctx,
                     4096, 32, kv_heads, head_dim, head_dim, None, None)


# The real default model's shape (Gemma 3 270M Q4_K_M).
GEMMA = ModelMeta("gemma3", "/models/gemma3.gguf", "gemma3", 253_113_024, 18, 32768, 640, 4, 1,
                  256, 256, None, "Gemma 3 270m")
MISTRAL_7B = make_model("mistral-7b-q4", 4_368_439_584, 32, 8, 128)  # 4.07 GiB
LLAMA_70B = make_model("llama-70b-q4", 40 * GiB, 80, 8, 128)
MODELS = [GEMMA, MISTRAL_7B, LLAMA_70B]

PROFILES = {
    "3090 workstation": make_hw(64, available_gb=60, gpus=(make_gpu(23.5),)),
    "16 GB mini PC": make_hw(16, available_gb=12),
    "M2 Mac 16 GB": make_hw(16, available_gb=10, apple=True, cpu="Apple M2"),
    "Raspberry Pi 4": make_hw(3.7, available_gb=3.2, machine="aarch64",
                              board="Raspberry Pi 4 Model B Rev 1.4"),
}

# Needs at a 4096-token context, by hand: weights + KV cache + 256 MiB compute buffer.
#   gemma: 253,113,024 + 18 x 4096 x 1 x 512 x 2 (72 MiB)  + 256 MiB = 0.56 GiB
#   7B:  4,368,439,584 + 32 x 4096 x 8 x 256 x 2 (512 MiB) + 256 MiB = 4.82 GiB
#   70B:        40 GiB + 80 x 4096 x 8 x 256 x 2 (1.25 GiB) + 256 MiB = 41.5 GiB
EXPECTED: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "3090 workstation": ("large-chat", [
        ("gpu", "needs 0.6 GiB, 23.5 GiB free on NVIDIA GeForce RTX 3090"),
        ("gpu", "needs 4.8 GiB, 23.5 GiB free on NVIDIA GeForce RTX 3090"),
        ("ram", "needs 41.5 GiB, 59.0 GiB of RAM free")]),
    "16 GB mini PC": ("small-chat", [
        ("ram", "needs 0.6 GiB, 11.0 GiB of RAM free"),
        ("ram", "needs 4.8 GiB, 11.0 GiB of RAM free"),
        ("none", "needs 41.5 GiB, only 11.0 GiB of RAM free")]),
    "M2 Mac 16 GB": ("small-chat", [
        ("gpu", "needs 0.6 GiB, 12.0 GiB free on Apple M2 (unified memory)"),
        ("gpu", "needs 4.8 GiB, 12.0 GiB free on Apple M2 (unified memory)"),
        ("none", "needs 41.5 GiB, only 12.0 GiB free on Apple M2 (unified memory) "
                 "and 9.0 GiB of RAM free")]),
    "Raspberry Pi 4": ("embeddings", [
        ("ram", "needs 0.6 GiB, 2.2 GiB of RAM free"),
        ("none", "needs 4.8 GiB, only 2.2 GiB of RAM free"),
        ("none", "needs 41.5 GiB, only 2.2 GiB of RAM free")]),
}


@pytest.mark.parametrize("profile", list(PROFILES))
def test_profiles(profile: str) -> None:
    caps = classify(PROFILES[profile], MODELS, 4096)
    role, fits = EXPECTED[profile]
    assert caps.role == role
    assert [(f.fit, f.reason) for f in caps.models] == fits
    assert [f.model for f in caps.models] == ["gemma3", "mistral-7b-q4", "llama-70b-q4"]
    assert [f.need_bytes for f in caps.models] == [597_045_952, 5_173_745_952, 44_560_285_696]


def test_kv_cache_bytes() -> None:
    assert kv_cache_bytes(MISTRAL_7B, 4096) == 512 * MiB  # 32 x 4096 x 8 x (128 + 128) x 2
    assert kv_cache_bytes(GEMMA, 4096) == 75_497_472  # 18 x 4096 x 1 x (256 + 256) x 2
    assert kv_cache_bytes(GEMMA, 10**6) == 603_979_776  # capped at the model's 32768
    unknown_ctx = make_model("x", GiB, 2, 1, 64, ctx=0)  # context_length absent from the file
    assert kv_cache_bytes(unknown_ctx, 1000) == 2 * 1000 * 1 * 128 * 2


@pytest.mark.parametrize(("hw", "role"), [
    (make_hw(64, available_gb=3, gpus=(make_gpu(16.0),)), "large-chat"),
    (make_hw(64, available_gb=3, gpus=(make_gpu(15.9),)), "small-chat"),
    (make_hw(64, available_gb=2, gpus=(make_gpu(4.0, 6),)), "small-chat"),
    (make_hw(64, available_gb=2, gpus=(make_gpu(3.9, 6),)), "coordinator"),
    (make_hw(32, available_gb=9), "small-chat"),  # 8 GiB usable after the 1 GiB reserve
    (make_hw(32, available_gb=8.9), "embeddings"),
    (make_hw(4, available_gb=3), "embeddings"),
    (make_hw(4, available_gb=2.9), "coordinator"),
    (make_hw(0.5, available_gb=0.2, machine="armv7l"), "coordinator"),
    (make_hw(24, available_gb=4, apple=True), "large-chat"),  # 75% of 24 GiB is 18
    (make_hw(16, available_gb=15, apple=True), "small-chat"),  # 75% of 16 GiB is 12
])
def test_role_thresholds(hw: Hardware, role: str) -> None:
    assert classify(hw, [], 4096).role == role


def test_the_gpu_with_most_free_memory_is_used() -> None:
    gpus = (make_gpu(7.5, 8, "NVIDIA GeForce RTX 3070"),
            make_gpu(20, 24, "NVIDIA GeForce RTX 4090", index=1))
    caps = classify(make_hw(32, gpus=gpus), [make_model("13b", 9 * GiB, 40, 8, 128)], 4096)
    assert caps.gpu_memory == 20 * GiB
    assert caps.models[0].fit == "gpu"
    assert caps.models[0].reason.endswith("20.0 GiB free on NVIDIA GeForce RTX 4090")


def test_overheads_are_parameters() -> None:
    hw = make_hw(8, available_gb=4.9)
    just_fits = make_model("m", 4 * GiB - 512 * MiB, 32, 8, 128)  # 3.5 GiB + 0.5 GiB KV
    assert classify(hw, [just_fits], 4096).models[0].fit == "none"  # 4.25 GiB > 3.9 GiB
    caps = classify(hw, [just_fits], 4096, compute_buffer=0, ram_reserve=int(0.9 * GiB))
    assert (caps.ram_memory, caps.models[0].need_bytes, caps.models[0].fit) == \
        (4 * GiB, 4 * GiB, "ram")
    assert classify(make_hw(1, available_gb=0.5), [], 4096).ram_memory == 0  # never negative


def test_context_decides_whether_a_model_fits() -> None:
    hw = make_hw(8, available_gb=6)  # 5 GiB usable
    assert classify(hw, [MISTRAL_7B], 4096).models[0].fit == "ram"  # 4.8 GiB
    assert classify(hw, [MISTRAL_7B], 32768).models[0].fit == "none"  # 8.3 GiB


def test_a_memory_limit_caps_ram_and_gpu() -> None:
    hw = make_hw(64, available_gb=60, gpus=(make_gpu(23.5),))
    caps = classify(hw, [GEMMA, MISTRAL_7B], 4096, memory_limit=2 * GiB)
    assert (caps.gpu_memory, caps.ram_memory) == (2 * GiB, 2 * GiB)
    assert [m.fit for m in caps.models] == ["gpu", "none"]
    assert classify(hw, [GEMMA], 4096, memory_limit=300 * MiB).models[0].fit == "none"
    assert caps.role == "embeddings"  # what the node may use, not what it has
