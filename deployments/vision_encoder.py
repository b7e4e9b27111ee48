"""VisionEncoder deployment (GPU when present): pixels -> image embeddings, cached by image hash."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from deployments.config import AppConfig
from deployments.messages import EncodedRequest, PreparedRequest
from deployments.metrics import VisionMetrics
from deployments.placement import resolve_device_dtype
from engine.embedding_cache import EmbeddingCache
from engine.vision import VisionEncoder


class VisionEncoderDeployment:
    def __init__(self, config: AppConfig):
        device, dtype = resolve_device_dtype(config)
        self.encoder = VisionEncoder.from_pretrained(config.model_dir, device=device, dtype=getattr(torch, dtype))
        self.cache = EmbeddingCache(config.vision_cache_mb * 2**20)
        self._lock = threading.Lock()  # one tower forward at a time; torch already uses every core
        self.metrics = VisionMetrics()
        self.metrics.record_cache(self.cache.stats(), self.cache.stats())

    def _encode(self, req: PreparedRequest) -> EncodedRequest:
        with self._lock:
            before = self.cache.stats()
            found = [self.cache.get(h) for h in req.image_hashes]
            todo = [i for i, e in enumerate(found) if e is None]
            if todo:
                t0 = time.perf_counter()
                grids = [req.prompt.image_grids[i] for i in todo]
                fresh = self.encoder.encode([req.pixel_values[i] for i in todo], grids)
                for i, emb in zip(todo, fresh):
                    emb = emb.cpu()  # cached and shipped on CPU: the Decoder may be on another GPU
                    self.cache.put(req.image_hashes[i], emb)
                    found[i] = emb
                self.metrics.encode.observe(time.perf_counter() - t0)
            self.metrics.record_cache(before, self.cache.stats())
        embeds = torch.cat(found) if found else None
        return EncodedRequest(req.prompt, embeds)

    async def encode(self, req: PreparedRequest) -> EncodedRequest:
        if not req.image_hashes:
            return EncodedRequest(req.prompt, None)
        return await asyncio.to_thread(self._encode, req)

    async def stats(self) -> dict:
        return self.cache.stats()

    async def ready(self) -> bool:
        return True
