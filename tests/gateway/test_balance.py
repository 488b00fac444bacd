"""`order`: which eligible target is tried first, from the loads (pure)."""

from __future__ import annotations

from gateway.resolve import Load, order

FULL, FREE, OFF = Load(4, 4), Load(1, 4), Load(0, 4, backing_off=True)


def test_first_keeps_the_written_order_while_slots_are_free() -> None:
    assert order(["a", "b", "c"], {"a": FREE, "b": FREE}, "first") == ("a", "b", "c")


def test_first_spills_over_past_full_and_backing_off_targets() -> None:
    assert order(["a", "b", "c"], {"a": FULL, "b": OFF, "c": FREE}, "first") == ("c", "a", "b")


def test_least_busy_spreads_by_the_share_of_busy_slots() -> None:
    loads = {"a": Load(3, 4), "b": Load(1, 2), "c": Load(1, 8)}
    assert order(["a", "b", "c"], loads, "least-busy") == ("c", "b", "a")


def test_least_busy_puts_a_backing_off_target_last_and_breaks_ties_as_written() -> None:
    assert order(["a", "b", "c"], {"a": OFF, "b": FREE, "c": FREE}, "least-busy") == \
        ("b", "c", "a")


def test_an_unknown_load_counts_as_free() -> None:  # an upstream reports no slots
    assert order(["a", "up"], {"a": FULL}, "first") == ("up", "a")
