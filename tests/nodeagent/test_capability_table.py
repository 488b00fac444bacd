"""Capability classification, table-driven over hardware profiles and model shapes."""

from __future__ import annotations

import pytest

from nodeagent.capability import GiB, classify, kv_cache_bytes
from nodeagent.hardware import Gpu, Hardware
from nodeagent.store import ModelMeta


def make_hw(ram_gb: float, *, gpus: tuple[Gpu, ...] = (), apple: bool = False,
            machine: str = "x86_64", board: str | None = None) -> Hardware:
    ram = int(ram_gb * GiB)
    return Hardware("h", "Darwin" if apple else "Linux", machine, "cpu", 8, 8, ram,
                    int(ram * 0.9), gpus, apple, board)


def make_gpu(vram_gb: float, name: str = "NVIDIA GeForce RTX 3090") -> Gpu:
    return Gpu(0, "nvidia", name, int(vram_gb * GiB), int(vram_gb * GiB * 0.95), "550.54")


def make_model(model_id: str, size_gb: float, layers: int, kv_heads: int, head_dim: int,
               ctx: int = 32768) -> ModelMeta:
    return ModelMeta(model_id, f"/m/{model_id}.gguf", "llama", int(size_gb * GiB), layers, ctx,
                     kv_heads * head_dim * 4, kv_heads * 4, kv_heads, head_dim, head_dim, None,
                     None)


GEMMA = ModelMeta("gemma-270m", "/m/g.gguf", "gemma3", 253_113_024, 18, 32768, 640, 4, 1, 256,
                  256, None, "Gemma 3 270m")
LLAMA_7B = make_model("7b-q4", 4.1, 32, 8, 128)
LLAMA_70B = make_model("70b-q4", 40.0, 80, 8, 128)

PROFILES = {
    "3090 workstation": make_hw(64, gpus=(make_gpu(24),)),
    "16 GB mini PC": make_hw(16),
    "M2 Mac 16 GB": make_hw(16, apple=True, machine="arm64"),
    "Raspberry Pi 4": make_hw(4, machine="aarch64", board="Raspberry Pi 4 Model B Rev 1.4"),
}

# profile -> (role, fit of gemma, fit of 7B, fit of 70B) at a 4096-token context
EXPECTED = {
    "3090 workstation": ("large-chat", "gpu", "gpu", "ram"),
    "16 GB mini PC": ("small-chat", "ram", "ram", "none"),
    "M2 Mac 16 GB": ("small-chat", "gpu", "gpu", "none"),
    "Raspberry Pi 4": ("embeddings", "ram", "none", "none"),
}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profiles(profile: str) -> None:
    caps = classify(PROFILES[profile], [GEMMA, LLAMA_7B, LLAMA_70B], 4096)
    role, *fits = EXPECTED[profile]
    assert caps.role == role
    assert [f.fit for f in caps.models] == fits
    for fit in caps.models:
        assert fit.need_bytes == fit.weights_bytes + fit.kv_cache_bytes + 256 * 1024**2
        assert "GiB" in fit.reason


def test_kv_cache_formula() -> None:
    # 32 layers x 4096 tokens x 8 kv heads x (128 + 128) x 2 bytes (f16) = 512 MiB
    assert kv_cache_bytes(LLAMA_7B, 4096) == 512 * 1024**2
    # the context is capped at the model's own
    assert kv_cache_bytes(GEMMA, 10**6) == 18 * 32768 * 1 * 512 * 2


def test_a_small_board_with_little_ram_only_coordinates() -> None:
    caps = classify(make_hw(1, machine="armv7l"), [GEMMA], 4096)
    assert caps.role == "coordinator"
    assert caps.models[0].fit == "none"


def test_context_decides_whether_a_model_fits() -> None:
    tight = make_hw(6.5)  # 5.85 GiB available, 4.85 usable after the reserve
    assert classify(tight, [LLAMA_7B], 2048).models[0].fit == "ram"
    assert classify(tight, [LLAMA_7B], 32768).models[0].fit == "none"


def test_every_gpu_is_considered() -> None:
    small, big = make_gpu(8, "RTX 3070"), Gpu(1, "nvidia", "RTX 4090", 24 * GiB, 23 * GiB, "x")
    caps = classify(make_hw(32, gpus=(small, big)), [make_model("13b", 9.0, 40, 8, 128)], 4096)
    assert caps.models[0].fit == "gpu"
    assert "RTX 4090" in caps.models[0].reason
