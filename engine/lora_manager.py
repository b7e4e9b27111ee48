"""Which adapters are resident in which engine slot: LRU over slots, CPU copies for the rest.

Adapters are registered by name with a version and their weights (kept on CPU). A sequence
acquires its adapter's slot when it is admitted and releases it when it ends; a slot in use is
never evicted, an idle one is reused least-recently-used first. Re-registering a resident
adapter rewrites its slot in place, between steps, without touching other slots.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.lora import AdapterSlots, LoRAWeights


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
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident adapters, least recently used first
        self._loaded_version: dict[str, int] = {}
        self._refs = [0] * (slots.num_slots if slots else 0)
        self.num_swaps = 0

    def register(self, name: str, weights: LoRAWeights, version: int = 1) -> None:
        if self.slots is None:
            raise ValueError("this engine was built with max_loras=0 and cannot serve adapters")
        self.slots.check(weights)  # fail before anything changes
        self.adapters[name] = RegisteredAdapter(name, version, weights)
        slot = self._slot_of.get(name)
        if slot is not None:  # hot swap in place
            self.slots.load(slot, weights)
            self._loaded_version[name] = version
            self.num_swaps += 1

    def unregister(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownAdapterError(name)
        del self.adapters[name]
        slot = self._slot_of.get(name)
        if slot is not None and self._refs[slot] == 0:
            del self._slot_of[name]
            self.slots.clear(slot)

    def version(self, name: str) -> int:
        if name not in self.adapters:
            raise UnknownAdapterError(name)
        return self.adapters[name].version

    def acquire(self, name: str) -> int | None:
        """Slot index for `name` (loading it if needed), or None while every slot is busy."""
        if name not in self.adapters:
            raise UnknownAdapterError(name)
        slot = self._slot_of.get(name)
        if slot is None:
            used = set(self._slot_of.values())
            free = [s for s in range(self.slots.num_slots) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next((n for n, s in self._slot_of.items() if self._refs[s] == 0), None)
                if victim is None:
                    return None
                slot = self._slot_of.pop(victim)
            self.slots.load(slot, self.adapters[name].weights)
            self._loaded_version[name] = self.adapters[name].version
            self._slot_of[name] = slot
            self.num_swaps += 1
        self._slot_of.move_to_end(name)
        self._refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            # An adapter unregistered while in use is dropped once its last sequence ends.
            for n, s in list(self._slot_of.items()):
                if s == slot and n not in self.adapters:
                    del self._slot_of[n]
                    self.slots.clear(slot)

    @property
    def resident(self) -> dict[str, int]:
        return dict(self._slot_of)
