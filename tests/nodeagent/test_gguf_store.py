"""The GGUF header reader and the model store: hand-built headers, corrupt files, the real model."""

from __future__ import annotations

import logging
import os
import struct
import time
from pathlib import Path

import pytest

from nodeagent.gguf import GGUFError, read_header
from nodeagent.store import ModelMeta, ModelStore, default_models_dir

_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
        11: "<q", 12: "<d"}
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def enc(kind: int, value: object) -> bytes:
    if kind in _FMT:
        return struct.pack(_FMT[kind], value)
    if kind == STR:
        data = str(value).encode()
        return struct.pack("<Q", len(data)) + data
    assert isinstance(value, tuple)
    elem, items = value
    return struct.pack("<IQ", elem, len(items)) + b"".join(enc(elem, i) for i in items)


def gguf(kvs: list[tuple[str, int, object]], version: int = 3) -> bytes:
    """A GGUF header with these (key, type, value) pairs and no tensors."""
    body = b"".join(enc(STR, k) + struct.pack("<I", t) + enc(t, v) for k, t, v in kvs)
    return b"GGUF" + struct.pack("<IQQ", version, 0, len(kvs)) + body


def write_model(directory: Path, stem: str, arch: str = "llama", **numbers: int) -> Path:
    kvs: list[tuple[str, int, object]] = [("general.architecture", STR, arch)]
    kvs += [(f"{arch}.{k.replace('__', '.')}", U32, v) for k, v in numbers.items()]
    path = directory / f"{stem}.gguf"
    path.write_bytes(gguf(kvs))
    return path


EVERY_TYPE: list[tuple[str, int, object]] = [
    ("u8", U8, 255), ("i8", I8, -128), ("u16", U16, 65535), ("i16", I16, -32768),
    ("u32", U32, 2**32 - 1), ("i32", I32, -(2**31)), ("f32", F32, 0.5), ("bool", BOOL, True),
    ("str", STR, "héllo"), ("tokens", ARR, (STR, ["<s>", "", "▁the"])),
    ("scores", ARR, (F32, [0.0, -1.5])), ("nested", ARR, (ARR, [(STR, ["a"]), (U64, [1, 2])])),
    ("empty", ARR, (I64, [])), ("u64", U64, 2**64 - 1), ("i64", I64, -(2**63)),
    ("f64", F64, 1e-300), ("last", STR, "after the arrays"),
]


@pytest.mark.parametrize("version", [2, 3])
def test_reads_every_scalar_type_and_skips_arrays(tmp_path: Path, version: int) -> None:
    (tmp_path / "m.gguf").write_bytes(gguf(EVERY_TYPE, version) + b"\x00" * 64)
    assert read_header(tmp_path / "m.gguf").metadata == {
        k: v for k, t, v in EVERY_TYPE if t != ARR}


def test_header_counts_arrays_and_sizes_tensors_from_their_offsets(tmp_path: Path) -> None:
    kvs = [("general.alignment", U32, 64), *EVERY_TYPE]
    infos = b"".join(enc(STR, name) + struct.pack("<I2QIQ", 2, 4, 4, 0, offset)
                     for name, offset in (("blk.0.w", 128), ("token_embd.weight", 0)))
    header = gguf(kvs)[:8] + struct.pack("<Q", 2) + gguf(kvs)[16:] + infos  # 2 tensors
    data = -(-len(header) // 64) * 64
    (tmp_path / "m.gguf").write_bytes(header.ljust(data + 128 + 300, b"\x00"))
    found = read_header(tmp_path / "m.gguf")
    assert found.arrays == {"tokens": 3, "scores": 2, "nested": 2, "empty": 0}
    assert found.tensors == {"token_embd.weight": 128, "blk.0.w": 300}
    (tmp_path / "m.gguf").write_bytes(header.ljust(data + 100, b"\x00"))
    with pytest.raises(GGUFError, match="tensor data past its end"):
        read_header(tmp_path / "m.gguf")


HEADER = b"GGUF" + struct.pack("<IQ", 3, 0)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "not a GGUF file"),
    (b"GGU", "not a GGUF file"),
    (b"GGML" + b"\x00" * 40, "not a GGUF file"),
    (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "unsupported GGUF version 1"),
    (HEADER, "truncated"),
    (HEADER + struct.pack("<QQ", 1, 2**63), "truncated"),  # a key 8 EiB long
    (gguf([("k", STR, "value")])[:-2], "truncated"),
    (gguf([("k", ARR, (U32, [1] * 100))])[:-4], "truncated"),
    (gguf([("k", ARR, (STR, ["a"] * 100))])[:-1], "truncated"),
    (HEADER + struct.pack("<Q", 1) + enc(STR, "k") + struct.pack("<IIQ", ARR, U8, 2**62),
     "truncated"),
    (HEADER + struct.pack("<Q", 1) + enc(STR, "k") + struct.pack("<I", 13),
     "unknown GGUF value type 13 at key 'k'"),
    (gguf([("k", ARR, (13, []))]), "bad GGUF array element type 13"),
    (HEADER + struct.pack("<Q", 1) + enc(STR, "k") + struct.pack("<I", ARR)
     + struct.pack("<IQ", ARR, 1) * 12, "bad GGUF array element type 9"),  # nested 12 deep
])
def test_corrupt_files_raise_gguf_error(tmp_path: Path, data: bytes, message: str) -> None:
    (tmp_path / "bad.gguf").write_bytes(data)
    with pytest.raises(GGUFError, match=message):
        read_header(tmp_path / "bad.gguf")


def test_the_real_model(model_path: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    kv = read_header(model_path).metadata
    print(f"read {len(kv)} scalar keys in {(time.perf_counter() - started) * 1000:.0f} ms")
    assert "tokenizer.ggml.tokens" not in kv and kv["tokenizer.ggml.eos_token_id"] == 1
    (tmp_path / model_path.name).symlink_to(model_path)
    assert ModelStore(tmp_path).list() == [ModelMeta(
        id=model_path.stem, path=str(tmp_path / model_path.name), architecture="gemma3",
        file_size=253113024, n_layers=18, context_length=32768, embedding_length=640, n_head=4,
        n_head_kv=1, key_length=256, value_length=256, chat_template=None, name="Gemma 3 270m",
        n_vocab=262144, input_bytes=178257920, output_bytes=0, layers_bytes=68327424)]


def test_missing_numbers_take_their_defaults(tmp_path: Path) -> None:
    write_model(tmp_path, "tiny", block_count=2, embedding_length=512, attention__head_count=8)
    (meta,) = ModelStore(tmp_path).list()
    assert (meta.n_head_kv, meta.key_length, meta.value_length, meta.context_length) == \
        (8, 64, 64, 0)
    assert (meta.chat_template, meta.name, meta.file_size) == \
        (None, None, (tmp_path / "tiny.gguf").stat().st_size)


def test_unreadable_files_are_skipped_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_model(tmp_path, "good", block_count=1)
    (tmp_path / "garbage.gguf").write_bytes(b"not a model")
    (tmp_path / "dangling.gguf").symlink_to(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("not *.gguf, not looked at")
    store = ModelStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="myco.node.store"):
        assert [m.id for m in store.list()] == ["good"]
        assert [m.id for m in store.list()] == ["good"]
    skipped = sorted(r.getMessage() for r in caplog.records)  # once each, not per list()
    assert len(skipped) == 2
    assert "dangling.gguf" in skipped[0] and "No such file" in skipped[0]
    assert "garbage.gguf" in skipped[1] and "not a GGUF file" in skipped[1]


def test_headers_are_read_once_per_version_of_a_file(tmp_path: Path) -> None:
    path = write_model(tmp_path, "m", block_count=10)
    store = ModelStore(tmp_path)
    assert store.list()[0].n_layers == 10
    stat = path.stat()
    write_model(tmp_path, "m", block_count=20)  # same size; put the old mtime back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.list()[0].n_layers == 10  # cached: not re-read
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert store.list()[0].n_layers == 20


def test_aliases(tmp_path: Path) -> None:
    write_model(tmp_path, "gemma-3-270m-q4_k_m")
    write_model(tmp_path, "other")
    (tmp_path / "models.toml").write_text('[aliases]\n"gemma-3-270m-q4_k_m" = "gemma3"\n')
    store = ModelStore(tmp_path)
    assert [m.id for m in store.list()] == ["gemma3", "other"]
    assert store.get("gemma3") is not None and store.get("gemma-3-270m-q4_k_m") is None
    assert store.get("gemma3").path.endswith("gemma-3-270m-q4_k_m.gguf")  # type: ignore[union-attr]


@pytest.mark.parametrize(("toml", "message"), [
    ('[aliases]\n"a" = "x"\n"b" = \n', r"models\.toml: .*line 3"),
    ("[aliases\n", r"models\.toml: .*line 1"),
    ('[aliases]\n"a" = 1\n', r"models\.toml: \[aliases\] must map"),
    ('[aliases]\n"a" = "b"\n', r"models\.toml: model id 'b' names both a\.gguf and b\.gguf"),
])
def test_invalid_models_toml_names_the_file(tmp_path: Path, toml: str, message: str) -> None:
    write_model(tmp_path, "a")
    write_model(tmp_path, "b")
    (tmp_path / "models.toml").write_text(toml)
    with pytest.raises(ValueError, match=message):
        ModelStore(tmp_path).list()


def test_missing_directory_is_empty(tmp_path: Path) -> None:
    assert ModelStore(tmp_path / "absent").list() == []
    assert ModelStore(tmp_path / "absent").get("x") is None


def test_default_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MYCO_MODELS", str(tmp_path))
    assert default_models_dir() == tmp_path
    monkeypatch.delenv("MYCO_MODELS")
    assert default_models_dir().parts[-2:] == ("mycoswarm", "models")
