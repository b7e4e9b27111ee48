"""LRU cache of image embeddings keyed by content hash, bounded in bytes.

A repeated image (same pixels after preprocessing) skips the vision tower. Entries are evicted
least-recently-used first once the byte budget is exceeded; an entry larger than the whole
budget is simply not kept.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def _size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def get(self, key: str) -> torch.Tensor | None:
        t = self._entries.get(key)
        if t is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key: str, value: torch.Tensor) -> None:
        size = self._size(value)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.num_bytes -= self._size(old)
        self._entries[key] = value
        self.num_bytes += size
        while self.num_bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= self._size(evicted)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self), "bytes": self.num_bytes,
                "max_bytes": self.max_bytes, "evictions": self.evictions}
