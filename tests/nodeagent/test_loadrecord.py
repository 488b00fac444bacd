"""Reading and checking a load record, on log text copied from a real two-worker load
(n_gpu_layers 12, tensor_split 1,1, the 18-layer Gemma 3 270M); tests/nodeagent/test_rpc.py
does the same with live runners."""

from __future__ import annotations

from nodeagent.runner.loadrecord import check, parse

A, B = "127.0.0.1:50211", "127.0.0.1:50212"
DEVICES = ("CPU",) * 7 + ("RPC0",) * 6 + ("RPC1",) * 6
BUFFERS = f"""\
llama_prepare_model_devices: using device RPC0 ({A}) (unknown id) - 24105 MiB free
llama_prepare_model_devices: using device RPC1 ({B}) (unknown id) - 24105 MiB free
load_tensors:   CPU_Mapped model buffer size =   195.15 MiB
load_tensors:   CPU_REPACK model buffer size =     5.27 MiB
load_tensors: RPC0[{A}] model buffer size =    21.34 MiB
load_tensors: RPC0[{B}] model buffer size =   188.67 MiB
llama_context:        CPU  output buffer size =     1.00 MiB
llama_kv_cache:        CPU KV buffer size =     0.50 MiB
llama_kv_cache: RPC0[{A}] KV buffer size =     0.50 MiB
llama_kv_cache: RPC0[{B}] KV buffer size =     0.50 MiB
llama_kv_cache:        CPU KV buffer size =     3.00 MiB
llama_kv_cache: RPC0[{A}] KV buffer size =     2.50 MiB
llama_kv_cache: RPC0[{B}] KV buffer size =     2.00 MiB
sched_reserve: RPC0[{A}] compute buffer size =    18.51 MiB
sched_reserve: RPC0[{B}] compute buffer size =   513.25 MiB
sched_reserve:        CPU compute buffer size =    19.76 MiB
"""


def log(devices: tuple[str, ...] = DEVICES) -> str:
    assigned = "".join(f"load_tensors: layer {i:3d} assigned to device {d}, is_swa = 1\n"
                       for i, d in enumerate(devices))
    return BUFFERS.replace("load_tensors:   CPU_Mapped", assigned + "load_tensors:   CPU_Mapped")


def mib(x: float) -> int:
    return round(x * 2**20)


def test_parse_names_each_devices_layers_and_bytes() -> None:
    record = parse(log(), n_gpu_layers=12, tensor_split=(1.0, 1.0), load_seconds=1.5)
    assert record.n_layers == 18
    cpu, rpc0, rpc1 = record.devices
    assert (cpu.name, cpu.description, cpu.layers) == ("CPU", "", tuple(range(7)))
    assert (rpc0.name, rpc0.description, rpc0.layers) == ("RPC0", A, tuple(range(7, 13)))
    assert (rpc1.name, rpc1.description, rpc1.layers) == ("RPC1", B, tuple(range(13, 19)))
    # Both workers name their buffers RPC0[...]: told apart by endpoint.
    assert cpu.weights_bytes == mib(195.15) + mib(5.27)
    assert (rpc1.weights_bytes, rpc1.kv_bytes, rpc1.compute_bytes) == (
        mib(188.67), mib(0.5) + mib(2.0), mib(513.25))
    assert check(record, [A, B]) == []


def test_check_catches_layers_elsewhere_than_planned() -> None:
    record = parse(log(), n_gpu_layers=12, tensor_split=(2.0, 1.0), load_seconds=1)
    assert check(record, [A, B]) == [
        f"RPC0 ({A}) holds layers 7-12, planned layers 7-14",
        f"RPC1 ({B}) holds layers 13-17 + output, planned layers 15-17 + output"]


def test_check_catches_a_worker_without_layers_and_a_local_fallback() -> None:
    starved = ("CPU",) * 13 + ("RPC1",) * 6
    record = parse(log(starved), n_gpu_layers=6, tensor_split=(0.0, 1.0), load_seconds=1)
    assert check(record, [A, B]) == [f"RPC0 ({A}) holds no layers"]
    local = parse(log(("CPU",) * 19), n_gpu_layers=12, tensor_split=(1.0, 1.0), load_seconds=1)
    assert check(local, [A, B]) == [
        "CPU holds layers 0-17 + output, planned layers 0-6",
        f"RPC0 ({A}) holds no layers, planned layers 7-12",
        f"RPC1 ({B}) holds no layers, planned layers 13-17 + output"]


def test_check_catches_other_workers_than_registered() -> None:
    record = parse(log(), n_gpu_layers=12, tensor_split=(1.0, 1.0), load_seconds=1)
    assert check(record, [B, A]) == [
        f"llama.cpp uses RPC devices at {[A, B]}, the runner registered {[B, A]}"]
    assert check(parse("", n_gpu_layers=0, tensor_split=(), load_seconds=0), []) == [
        "llama.cpp logged no layer assignments"]
