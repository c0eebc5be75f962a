"""Exactly-once accounting: a unit is finished when every one of its samples came back written or dropped."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipelines.sources.base import InputUnit
from services.cache.manifest import ShardInfo, UnitProgress


class AccountingError(RuntimeError):
    """Writer output that contradicts exactly-once delivery (a sample seen twice, an unknown unit)."""


@dataclass
class _UnitState:
    unit: InputUnit
    started: float
    total: int = -1
    indices: set[int] = field(default_factory=set)
    shards: dict[str, ShardInfo] = field(default_factory=dict)
    failures: Counter = field(default_factory=Counter)
    error: str = ""

    def complete(self) -> bool:
        return self.total >= 0 and not self.error and len(self.indices) == self.total


class UnitLedger:
    """Collects the writer's account rows per unit and says when a unit is complete."""

    def __init__(self, units: list[InputUnit]) -> None:
        now = time.monotonic()
        self._open = {unit.name: _UnitState(unit, now) for unit in units}
        self.finished: list[UnitProgress] = []
        self.failed: dict[str, str] = {}  # unit -> why it cannot finish in this run
        self.samples_written = 0
        self.bytes_written = 0
        self.failures: Counter = Counter()

    def record(self, account: dict[str, Any]) -> UnitProgress | None:
        """Add one account row; returns the unit's progress record when this row completed the unit."""
        name = account["unit"]
        if name in self.failed:
            return None
        state = self._open.get(name)
        if state is None:
            raise AccountingError(f"writer reported unit {name!r}, which this run did not schedule or already finished")
        repeated = state.indices.intersection(account["indices"])
        if repeated or len(set(account["indices"])) != len(account["indices"]):
            # Never publish a unit whose samples could sit in two shards: it is redone by the next run.
            self._fail(name, f"sample indices {sorted(repeated)[:5] or account['indices'][:5]} came back twice")
            return None
        state.indices.update(account["indices"])
        for shard in json.loads(account["shards"]):
            info = ShardInfo.model_validate(shard)
            state.shards[info.path] = info
        state.failures.update(json.loads(account["failures"]))
        if account["total"] >= 0:
            state.total = account["total"]
        if account["error"]:
            self._fail(name, account["error"])
            return None
        self.samples_written += account["samples_written"]
        self.bytes_written += account["bytes"]
        self.failures.update(json.loads(account["failures"]))
        if state.total >= 0 and len(state.indices) > state.total:
            self._fail(name, f"{len(state.indices)} samples came back but the unit has {state.total}")
            return None
        if not state.complete():
            return None
        del self._open[name]
        progress = UnitProgress(
            unit=name,
            input_uri=state.unit.uri,
            shards=sorted(state.shards.values(), key=lambda shard: shard.path),
            samples_written=sum(shard.num_samples for shard in state.shards.values()),
            failures=dict(sorted(state.failures.items())),
            seconds=time.monotonic() - state.started,
        )
        self.finished.append(progress)
        return progress

    def close(self) -> dict[str, str]:
        """After the last row: every unit that did not complete, with the reason (they are redone next run)."""
        for name, state in list(self._open.items()):
            seen = f"{len(state.indices)} of {state.total if state.total >= 0 else 'an unknown number of'} samples"
            self._fail(name, f"the stream ended with {seen} accounted for")
        return dict(self.failed)

    def _fail(self, name: str, reason: str) -> None:
        self._open.pop(name, None)
        self.failed[name] = reason
