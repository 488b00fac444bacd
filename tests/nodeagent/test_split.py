"""llama.cpp's n_gpu_layers + tensor_split mapping, both ways (rows marked "log" were read from
real load logs of the 18-layer Gemma 3 270M; tests/nodeagent/test_rpc.py checks more live)."""

from __future__ import annotations

import itertools

import pytest

from myco.layers import CPU, assign_layers, layer_shares, layer_split

# shares (CPU first, units = layers + the output layer) -> (n_gpu_layers, tensor_split)
FORWARD = [
    ((19,), (0, ())),  # all on the CPU
    ((0, 19), (19, (19.0,))),  # everything on one device (log)
    ((17, 2), (2, (2.0,))),  # the last layer and the output (log)
    ((7, 6, 6), (12, (6.0, 6.0))),  # (log)
    ((5, 0, 14), (14, (0.0, 14.0))),  # a device in the middle left out
    ((2, 6, 11), (17, (6.0, 11.0))),
]


@pytest.mark.parametrize(("shares", "expected"), FORWARD)
def test_layer_split(shares: tuple[int, ...], expected: tuple[int, tuple[float, ...]]) -> None:
    assert layer_split(shares) == expected
    n_gpu_layers, split = expected
    assert layer_shares(18, n_gpu_layers, split, len(shares) - 1) == shares


# (n_gpu_layers, tensor_split, devices) -> units on CPU, dev0, dev1, ... for 18 layers
INVERSE = [
    (12, (1.0, 1.0), 2, (7, 6, 6)),  # proportional shares (log)
    (-1, (1.0,), 1, (0, 19)),  # -1: all (log)
    (1, (1.0,), 1, (18, 1)),  # the output layer alone (log)
    (0, (), 2, (19, 0, 0)),  # nothing offloaded: no split needed
    (19, (3.0,), 2, (0, 19, 0)),  # tensor_split shorter than the devices: zeros after
    (19, (1.0, 1.0, 5.0), 2, (0, 10, 9)),  # longer: cut to the devices
    (40, (1.0,), 1, (0, 19)),  # more than the model has
]


@pytest.mark.parametrize(("ngl", "split", "devices", "expected"), INVERSE)
def test_layer_shares(ngl: int, split: tuple[float, ...], devices: int,
                      expected: tuple[int, ...]) -> None:
    assert layer_shares(18, ngl, split, devices) == expected


def test_offloaded_units_are_the_last_ones_and_contiguous_per_device() -> None:
    assert assign_layers(18, 12, (1.0, 1.0), 2) == (CPU,) * 7 + (0,) * 6 + (1,) * 6


@pytest.mark.parametrize("n_layers", [1, 18, 80])
def test_every_split_round_trips(n_layers: int) -> None:
    units = n_layers + 1
    step = max(1, units // 12)
    for cpu, a, b in itertools.product(range(0, units + 1, step), repeat=3):
        if cpu + a + b <= units:
            shares = (cpu, a, b, units - cpu - a - b)
            ngl, split = layer_split(shares)
            assert layer_shares(n_layers, ngl, split, 3) == shares, shares


def test_unpredictable_or_invalid_splits_are_refused() -> None:
    with pytest.raises(ValueError, match="free memory"):
        assign_layers(18, 5, (), 2)
    with pytest.raises(ValueError, match="counts"):
        layer_split((3, -1))
    with pytest.raises(ValueError, match="counts"):
        layer_split(())
