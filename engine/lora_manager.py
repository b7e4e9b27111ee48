"""Which adapter version is resident in which engine slot: LRU over slots, CPU copies for the rest.

Adapters are registered by name with a version and their weights (kept on CPU). A sequence
acquires a slot holding its adapter's current version when it is admitted and releases it when
it ends; a slot in use is never evicted, an idle one is reused least-recently-used first.

A request is served by exactly one version: registering a new version of an adapter whose slot
is in use leaves that slot to the running sequences (it retires when the last one ends) and
loads the new version into another slot for requests admitted afterwards. An idle slot is
rewritten in place.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from vlora.engine.lora import AdapterSlots, LoRAWeights


@dataclass(slots=True)
class RegisteredAdapter:
    name: str
    version: int
    weights: LoRAWeights


class UnknownAdapterError(KeyError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"adapter {self.name!r} is not loaded"


class LoRAManager:
    def __init__(self, slots: AdapterSlots | None):
        self.slots = slots
        self.adapters: dict[str, RegisteredAdapter] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # current versions, least recently used first
        self._version_in: dict[int, int] = {}  # slot -> version it holds
        self._retiring: set[int] = set()  # slots holding a superseded version still used by running sequences
        self._refs = [0] * (slots.num_slots if slots else 0)
        self.num_swaps = 0  # adapter weights written into a slot

    def register(self, name: str, weights: LoRAWeights, version: int = 1) -> None:
        if self.slots is None:
            raise ValueError("this engine was built with max_loras=0 and cannot serve adapters")
        self.slots.check(weights)  # fail before anything changes
        self.adapters[name] = RegisteredAdapter(name, version, weights)
        slot = self._slot_of.get(name)
        if slot is None:
            return
        if self._refs[slot] == 0:  # idle: rewrite in place
            self._write(slot, name)
        else:  # running sequences keep their version; the next acquire loads the new one elsewhere
            del self._slot_of[name]
            self._retiring.add(slot)

    def unregister(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownAdapterError(name)
        del self.adapters[name]
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self._retire(slot)

    def version(self, name: str) -> int:
        if name not in self.adapters:
            raise UnknownAdapterError(name)
        return self.adapters[name].version

    def slot_version(self, slot: int) -> int:
        return self._version_in[slot]

    def acquire(self, name: str) -> int | None:
        """Slot holding `name`'s current version (loading it if needed), or None while every slot is busy."""
        if name not in self.adapters:
            raise UnknownAdapterError(name)
        slot = self._slot_of.get(name)
        if slot is None:
            taken = set(self._slot_of.values()) | self._retiring
            free = [s for s in range(self.slots.num_slots) if s not in taken]
            if free:
                slot = free[0]
            else:
                victim = next((n for n, s in self._slot_of.items() if self._refs[s] == 0), None)
                if victim is None:
                    return None
                slot = self._slot_of.pop(victim)
            self._write(slot, name)
            self._slot_of[name] = slot
        self._slot_of.move_to_end(name)
        self._refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self._refs[slot] -= 1
        if self._refs[slot] == 0 and slot in self._retiring:
            self._retiring.discard(slot)
            self.slots.clear(slot)
            self._version_in.pop(slot, None)

    def _write(self, slot: int, name: str) -> None:
        adapter = self.adapters[name]
        self.slots.load(slot, adapter.weights)
        self._version_in[slot] = adapter.version
        self.num_swaps += 1

    def _retire(self, slot: int) -> None:
        if self._refs[slot] == 0:
            self.slots.clear(slot)
            self._version_in.pop(slot, None)
        else:
            self._retiring.add(slot)

    @property
    def resident(self) -> dict[str, int]:
        return dict(self._slot_of)
