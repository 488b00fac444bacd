"""The GGUF header reader and the model store, on the real default model."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from nodeagent.gguf import GGUFError, read_header
from nodeagent.hardware import detect, parse_cpuinfo
from nodeagent.store import ModelStore
from tests.conftest import MODEL_ID


def test_reads_the_default_model_header(model_file: Path) -> None:
    started = time.perf_counter()
    kv = read_header(model_file).metadata
    print(f"read {len(kv)} scalar keys in {(time.perf_counter() - started) * 1000:.1f} ms")
    assert kv["general.architecture"] == "gemma3"
    assert kv["gemma3.block_count"] == 18
    assert "tokenizer.ggml.tokens" not in kv  # arrays: only their length, in .arrays


def test_store_lists_metadata(models_dir: Path) -> None:
    (meta,) = ModelStore(models_dir).list()
    assert (meta.id, meta.architecture, meta.n_layers, meta.context_length) == \
        (MODEL_ID, "gemma3", 18, 32768)
    assert (meta.n_head, meta.n_head_kv, meta.key_length, meta.embedding_length) == \
        (4, 1, 256, 640)
    assert meta.file_size == 253113024
    assert meta.chat_template is None


def test_garbage_and_truncated_files(tmp_path: Path, model_file: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "garbage.gguf").write_bytes(b"not a model at all")
    (tmp_path / "cut.gguf").write_bytes(model_file.read_bytes()[:5000])
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_header(tmp_path / "garbage.gguf")
    with pytest.raises(GGUFError, match="truncated"):
        read_header(tmp_path / "cut.gguf")
    with caplog.at_level(logging.WARNING):
        assert ModelStore(tmp_path).list() == []
    assert "garbage.gguf" in caplog.text and "cut.gguf" in caplog.text


def test_aliases(tmp_path: Path, model_file: Path) -> None:
    (tmp_path / model_file.name).symlink_to(model_file)
    (tmp_path / "models.toml").write_text(f'[aliases]\n"{MODEL_ID}" = "gemma3"\n')
    store = ModelStore(tmp_path)
    assert [m.id for m in store.list()] == ["gemma3"]
    assert store.get("gemma3") is not None and store.get(MODEL_ID) is None
    (tmp_path / "models.toml").write_text("[aliases\n")
    with pytest.raises(ValueError, match=r"models\.toml.*line 1"):
        store.list()


def test_missing_directory_is_empty(tmp_path: Path) -> None:
    assert ModelStore(tmp_path / "absent").list() == []


X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD Ryzen 9 5950X 16-Core\n"
PI = ("processor\t: 0\nBogoMIPS\t: 108.00\nHardware\t: BCM2835\n"
      "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n")


@pytest.mark.parametrize(("text", "name"), [(X86, "AMD Ryzen 9 5950X 16-Core"),
                                            (PI, "Raspberry Pi 4 Model B Rev 1.4"), ("", "")])
def test_parse_cpuinfo(text: str, name: str) -> None:
    assert parse_cpuinfo(text) == name


def test_detect_on_this_machine() -> None:
    import shutil
    import subprocess

    hw = detect()
    assert hw.cpu_cores >= 1 and hw.cpu_physical_cores >= 1
    assert 0 < hw.ram_available <= hw.ram_total
    assert hw.cpu_model
    has_gpu = shutil.which("nvidia-smi") and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0
    if not has_gpu:
        assert hw.gpus == ()  # missing NVML is the normal case, not an error
    else:
        assert hw.gpus and all(g.vendor == "nvidia" and g.memory_total > 0 for g in hw.gpus)
