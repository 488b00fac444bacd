"""What this gateway has in flight to each target, and which targets asked it to back off.

`InFlight.begin(target, model)` counts a request until the returned callable is called (when
its answer has been relayed to its end); `back_off(target, seconds)` remembers a Retry-After.
`loads(model, swarm)` combines both with what the nodes last reported (`NodeView.pending`, the
requests they run or queue, from any gateway) into the `Load`s that `resolve` orders by.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from gateway.policy import model_key
from gateway.resolve import Load, NodeView, Swarm


class InFlight:
    def __init__(self) -> None:
        self._count: collections.Counter[tuple[str, str]] = collections.Counter()
        self._until: dict[str, float] = {}

    def begin(self, target: str, model: str) -> Callable[[], None]:
        key = (target, model_key(model))
        self._count[key] += 1
        done = False

        def end() -> None:
            nonlocal done
            if not done:
                done = True
                self._count[key] -= 1
        return end

    def back_off(self, target: str, seconds: float) -> None:
        self._until[target] = time.monotonic() + seconds

    def loads(self, model: str, swarm: Swarm) -> dict[str, Load]:
        key, now, loads = model_key(model), time.monotonic(), {}
        for target in set(swarm) | {t for t, _ in self._count} | set(self._until):
            view = swarm.get(target, NodeView(target, False))
            loads[target] = Load(max(self._count[target, key], view.pending.get(key, 0)),
                                 view.slots, self._until.get(target, 0) > now)
        return loads
