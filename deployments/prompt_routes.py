"""How a prompt reaches the Decoder from the Ingress: text in place, images through the DAG.

A text-only prompt needs only the chat template and the tokenizer (well under a millisecond on
the tiny model, a few on a long real prompt), so the Ingress builds it itself and hands the
Decoder a ready `PreparedRequest`: no Preprocessor hop, no Ray object to resolve. A prompt with
images goes Preprocessor -> VisionEncoder (CPU image work, then the vision tower), and the
Ingress hands the Decoder that chain's response without awaiting it.
"""

from __future__ import annotations

from vlora.deployments.errors import to_api_error
from vlora.deployments.messages import PreparedRequest
from vlora.deployments.openai_api import ApiError
from vlora.engine.prompts import PromptBuilder, PromptError


def has_images(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) and any(
        isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"]) for m in messages)


class PromptRoutes:
    def __init__(self, model_dir: str, preprocessor, vision_encoder):
        self.builder = PromptBuilder.from_pretrained(model_dir)
        self.preprocessor = preprocessor
        self.vision = vision_encoder

    @property
    def tokenizer(self):
        return self.builder.tokenizer

    def chat(self, messages: list[dict], tools: list[dict] | None = None):
        """A PreparedRequest for text-only messages; else the VisionEncoder's (unawaited) response.
        `tools` (OpenAI function tools) are rendered by the chat template."""
        if has_images(messages):
            return self.vision.encode.remote(self.preprocessor.prepare_chat.remote(messages, tools))
        return self._local(self.builder.build_chat, messages, [], True, tools)

    def text(self, prompt: str) -> PreparedRequest:
        """/v1/completions: the prompt tokenized as is."""
        return self._local(self.builder.build_text, prompt)

    def tokens(self, token_ids: list[int], vocab_size: int) -> PreparedRequest:
        """/v1/completions: a prompt given as token ids (a bad one is a 400 naming `prompt`)."""
        try:
            return PreparedRequest(self.builder.build_tokens(token_ids, vocab_size))
        except PromptError as exc:
            raise ApiError(400, str(exc), param="prompt") from None

    @staticmethod
    def _local(build, *args) -> PreparedRequest:
        try:
            return PreparedRequest(build(*args))
        except Exception as exc:
            raise (to_api_error(exc) or exc) from None
