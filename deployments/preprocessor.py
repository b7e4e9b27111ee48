"""Preprocessor deployment (CPU replicas): chat template, tokens, image loading and transform.

Only prompts with images come here; the Ingress tokenizes text-only prompts itself.
"""

from __future__ import annotations

import asyncio
import time

from deployments.config import AppConfig
from deployments.errors import to_api_error
from deployments.messages import PreparedRequest
from deployments.metrics import PreprocessMetrics
from engine.images import ImageLoadPolicy, ImageTransform, load_image
from engine.prompts import PromptBuilder


class Preprocessor:
    def __init__(self, config: AppConfig):
        self.builder = PromptBuilder.from_pretrained(config.model_dir)
        self.transform = ImageTransform.from_pretrained(config.model_dir)
        im = config.images
        self.policy = ImageLoadPolicy(max_bytes=im.max_image_bytes, max_image_pixels=im.max_image_pixels,
                                      allow_http=im.allow_http, http_timeout_s=im.http_timeout_s,
                                      allowed_local_dirs=tuple(im.allowed_local_dirs))
        self.metrics = PreprocessMetrics()

    def _image(self, url: str):
        t0 = time.perf_counter()
        image = self.transform(load_image(url, self.policy))
        self.metrics.image.observe(time.perf_counter() - t0)
        self.metrics.images.inc(1)
        return image

    def _prepare_chat(self, messages: list[dict]) -> PreparedRequest:
        images = [self._image(url) for url in PromptBuilder.image_urls(messages)]
        prompt = self.builder.build_chat(messages, [im.grid_thw for im in images])
        return PreparedRequest(prompt, [im.pixel_values for im in images], [im.content_hash for im in images])

    async def prepare_chat(self, messages: list[dict]) -> PreparedRequest:
        try:
            return await asyncio.to_thread(self._prepare_chat, messages)
        except Exception as exc:
            raise (to_api_error(exc) or exc) from None

    async def ready(self) -> bool:
        return True
