"""Preprocessor deployment (CPU replicas): chat template, tokens, image loading and transform.

Only prompts with images come here; the Ingress tokenizes text-only prompts itself.

Images are paid for in order of cost: count, then bytes, then headers (pixels of each image and
of all together, and the prompt length their grids give, checked against the context), and only
then are pixels decoded and transformed.
"""

from __future__ import annotations

import asyncio
import time

from vlora.deployments.config import AppConfig
from vlora.deployments.errors import to_api_error
from vlora.deployments.image_fetch import image_load_policy
from vlora.deployments.messages import PreparedRequest
from vlora.deployments.metrics import PreprocessMetrics
from vlora.deployments.openai_api import ApiError
from vlora.engine.images import ImageTransform, finish_decode, open_image, read_image_bytes
from vlora.engine.model import TextConfig
from vlora.engine.prompts import PromptBuilder


def context_length_error(num_tokens: int, max_model_len: int) -> ApiError:
    return ApiError(400, f"this model's maximum context length is {max_model_len} tokens, but the prompt alone is "
                         f"{num_tokens} tokens (images included); send fewer or smaller images or a shorter prompt",
                    param="messages", code="context_length_exceeded")


class Preprocessor:
    def __init__(self, config: AppConfig):
        self.builder = PromptBuilder.from_pretrained(config.model_dir)
        self.transform = ImageTransform.from_pretrained(config.model_dir)
        self.images = config.images
        self.policy = image_load_policy(config.images)
        self.max_model_len = config.engine.max_model_len or TextConfig.from_pretrained(
            config.model_dir).max_position_embeddings
        self.metrics = PreprocessMetrics()

    def _prepare_chat(self, messages: list[dict], tools: list[dict] | None = None) -> PreparedRequest:
        urls = PromptBuilder.image_urls(messages)
        lim = self.images
        if len(urls) > lim.max_images_per_request:
            raise ApiError(400, f"the request has {len(urls)} images; at most {lim.max_images_per_request} are "
                                "allowed per request", param="messages", code="too_many_images")
        t0 = time.perf_counter()
        opened = [open_image(read_image_bytes(url, self.policy), self.policy) for url in urls]
        pixels = sum(img.width * img.height for img in opened)
        if pixels > lim.max_total_pixels:
            raise ApiError(400, f"the request's images have {pixels} pixels together, above the limit of "
                                f"{lim.max_total_pixels}; send fewer or smaller images", param="messages")
        if opened:  # the prompt length the headers imply, before any pixel is decoded
            grids = [self.transform.grid_thw(img.height, img.width) for img in opened]
            estimate = self.builder.build_chat(messages, grids, tools=tools).num_tokens
            if estimate >= self.max_model_len:
                raise context_length_error(estimate, self.max_model_len)
        images = [self.transform(finish_decode(img)) for img in opened]
        if images:  # per image: the request's load + decode + transform time, shared evenly
            per_image = (time.perf_counter() - t0) / len(images)
            for _ in images:
                self.metrics.image.observe(per_image)
            self.metrics.images.inc(len(images))
        prompt = self.builder.build_chat(messages, [im.grid_thw for im in images], tools=tools)
        return PreparedRequest(prompt, [im.pixel_values for im in images], [im.content_hash for im in images])

    async def prepare_chat(self, messages: list[dict], tools: list[dict] | None = None) -> PreparedRequest:
        try:
            return await asyncio.to_thread(self._prepare_chat, messages, tools)
        except Exception as exc:
            raise (to_api_error(exc) or exc) from None

    async def ready(self) -> bool:
        return True
