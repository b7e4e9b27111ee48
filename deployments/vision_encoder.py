"""VisionEncoder deployment (GPU when present): pixels -> image embeddings, cached by image hash.

Concurrent requests are batched by Serve (`@serve.batch`, sized by `vision_encoder.max_batch_size`
and `batch_wait_timeout_s`): the images of a whole batch that are not in the cache are encoded in
one tower forward (several when they exceed `max_batch_patches`), each image hash once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

import torch
from ray import serve

from vlora.deployments.config import AppConfig
from vlora.deployments.messages import EncodedRequest, PreparedRequest
from vlora.deployments.metrics import VisionMetrics, in_replica
from vlora.deployments.placement import resolve_device_dtype
from vlora.engine.embedding_cache import EmbeddingCache
from vlora.engine.vision import VisionEncoder

RECENT_BATCHES = 64  # batch sizes kept for stats()


def _host(emb: torch.Tensor) -> torch.Tensor:
    """The one copy an embedding takes here: to host memory (the Decoder may be on another GPU), or
    on CPU out of the batch's output tensor so a cached image does not pin the whole batch."""
    return emb.cpu() if emb.device.type != "cpu" else emb.clone()


def chunk_by_patches(sizes: list[int], max_patches: int) -> list[list[int]]:
    """Consecutive indices grouped so each group holds <= max_patches (an oversized item alone)."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if not groups or total + n > max_patches:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


class VisionEncoderDeployment:
    def __init__(self, config: AppConfig):
        device, dtype = resolve_device_dtype(config)
        self.encoder = VisionEncoder.from_pretrained(config.model_dir, device=device, dtype=getattr(torch, dtype))
        self.cache = EmbeddingCache(config.vision_cache_mb * 2**20)
        self._lock = threading.Lock()  # one tower forward at a time; torch already uses every core
        self.metrics = VisionMetrics()
        self.metrics.record_cache(self.cache.stats(), self.cache.stats())
        vc = config.vision_encoder
        self.max_batch_patches = vc.max_batch_patches
        self._batched = in_replica()  # outside Serve (unit tests) each request is its own batch
        if self._batched:
            self._encode_batch.set_max_batch_size(vc.max_batch_size)
            self._encode_batch.set_batch_wait_timeout_s(vc.batch_wait_timeout_s)
        self.num_batches = 0
        self.recent_batch_sizes: deque[int] = deque(maxlen=RECENT_BATCHES)  # requests per batch, newest last

    def _encode_requests(self, reqs: list[PreparedRequest]) -> list[EncodedRequest | Exception]:
        """Cache lookups, then the missing images of every request in as few forwards as the patch bound allows."""
        results: list[EncodedRequest | Exception | None] = [None] * len(reqs)
        with self._lock:
            before = self.cache.stats()
            found: dict[str, torch.Tensor] = {}
            todo: dict[str, tuple[torch.Tensor, tuple[int, int, int]]] = {}  # hash -> (pixels, grid), first seen
            for r, req in enumerate(reqs):
                try:
                    self.encoder.check_inputs(req.pixel_values, req.prompt.image_grids)
                except ValueError as exc:  # this request fails alone; the others of the batch go on
                    results[r] = exc
                    continue
                for h, pixels, grid in zip(req.image_hashes, req.pixel_values, req.prompt.image_grids):
                    if h in found or h in todo:
                        continue
                    emb = self.cache.get(h)
                    if emb is None:
                        todo[h] = (pixels, tuple(grid))
                    else:
                        found[h] = emb
            hashes = list(todo)
            for group in chunk_by_patches([todo[h][0].shape[0] for h in hashes], self.max_batch_patches):
                t0 = time.perf_counter()
                fresh = self.encoder.encode([todo[hashes[i]][0] for i in group], [todo[hashes[i]][1] for i in group])
                for i, emb in zip(group, fresh):
                    emb = _host(emb)
                    self.cache.put(hashes[i], emb)
                    found[hashes[i]] = emb
                self.metrics.encode.observe(time.perf_counter() - t0)
            self.metrics.record_cache(before, self.cache.stats())
            self.num_batches += 1
            self.recent_batch_sizes.append(len(reqs))
            self.metrics.batch_requests.observe(len(reqs))
        for r, req in enumerate(reqs):
            if results[r] is None:
                embeds = [found[h] for h in req.image_hashes]
                # one image (the common case) is passed on as it is: no concatenation copy
                results[r] = EncodedRequest(req.prompt, embeds[0] if len(embeds) == 1 else torch.cat(embeds))
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _encode_batch(self, reqs: list[PreparedRequest]) -> list[EncodedRequest | Exception]:
        return await asyncio.to_thread(self._encode_requests, reqs)

    async def encode(self, req: PreparedRequest) -> EncodedRequest:
        if not req.image_hashes:
            return EncodedRequest(req.prompt, None)
        if self._batched:
            result = await self._encode_batch(req)
        else:
            (result,) = await asyncio.to_thread(self._encode_requests, [req])
        if isinstance(result, Exception):
            raise result
        return result

    async def stats(self) -> dict:
        """Cache counts, plus how requests were batched: batches, tower forwards, recent requests per batch."""
        return {**self.cache.stats(), "num_batches": self.num_batches, "num_forwards": self.encoder.num_forwards,
                "images_encoded": self.encoder.num_images, "recent_batch_sizes": list(self.recent_batch_sizes)}

    async def ready(self) -> bool:
        return True
