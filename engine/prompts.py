"""Prompt preparation: OpenAI chat messages -> token ids + Qwen2.5-VL M-RoPE positions.

The checkpoint's own chat template renders the conversation (so a real Qwen2.5-VL checkpoint
renders exactly as it was trained), each image part becomes one `<|image_pad|>` which is then
expanded to the number of merged patches of that image, and the 3-row M-RoPE position ids are
computed here once, on a CPU replica, so the decoder never needs the image grids again: it only
needs `rope_delta` to place generated tokens.

Everything in a `PreparedPrompt` is plain Python or a CPU tensor. It crosses two process
boundaries per request (Ingress -> Decoder replica -> engine process), so it pickles its
positions as a numpy array (a pickled torch tensor goes through `torch.save` on both sides).
A text-only prompt has no position tensor at all: its three rows are `arange`, which the engine
uses without building them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlora.engine.tools import TOOLS_CHAT_TEMPLATE, template_renders_tools

ImageGrid = tuple[int, int, int]

CHAT_ROLES = ("system", "user", "assistant", "tool")
# OpenAI's newer name for the system turn; Qwen's template only knows "system".
ROLE_ALIASES = {"developer": "system"}
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")


class PromptError(ValueError):
    """A request whose messages or prompt cannot be turned into model input; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class PromptConfig:
    """The few model-config values prompt preparation needs (read from the checkpoint's config.json)."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    spatial_merge_size: int = 2
    tokens_per_second: float = 2.0

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> "PromptConfig":
        vision = config.get("vision_config") or {}
        return cls(
            image_token_id=int(config["image_token_id"]),
            video_token_id=int(config["video_token_id"]),
            vision_start_token_id=int(config["vision_start_token_id"]),
            vision_end_token_id=int(config["vision_end_token_id"]),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
            tokens_per_second=float(vision.get("tokens_per_second", 2)),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "PromptConfig":
        return cls.from_model_config(json.loads((Path(model_dir) / "config.json").read_text()))

    def image_token_count(self, grid: ImageGrid) -> int:
        """Placeholder tokens one image takes: its patches after the 2x2 (merge x merge) merger."""
        t, h, w = grid
        return (t * h * w) // (self.spatial_merge_size**2)


@dataclass(slots=True)
class PreparedPrompt:
    """Everything the vision encoder and decoder need about one prompt, computed once on the CPU."""

    token_ids: list[int]
    # LongTensor [3, L]: temporal / height / width M-RoPE rows of a prompt with images; None for a
    # text-only prompt, whose three rows are all 0..L-1 (`positions` builds them on demand)
    mrope: torch.Tensor | None
    rope_delta: int  # generated token k (0-based) sits at position L + k + rope_delta on all rows
    image_grids: list[ImageGrid] = field(default_factory=list)
    image_token_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) per image
    num_image_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def positions(self) -> torch.Tensor:
        """LongTensor [3, L] of M-RoPE positions."""
        if self.mrope is None:
            return torch.arange(len(self.token_ids)).expand(3, -1).contiguous()
        return self.mrope

    def decode_position(self, k: int) -> int:
        """M-RoPE position (same on all 3 rows) of the k-th generated token, 0-based."""
        return len(self.token_ids) + k + self.rope_delta

    def __reduce__(self):
        mrope = None if self.mrope is None else self.mrope.numpy()
        return _rebuild_prompt, (self.token_ids, mrope, self.rope_delta, self.image_grids,
                                 self.image_token_spans, self.num_image_tokens)


def _rebuild_prompt(token_ids, mrope, rope_delta, image_grids, image_token_spans, num_image_tokens):
    if mrope is not None:
        mrope = torch.from_numpy(mrope if mrope.flags.writeable else mrope.copy())  # Ray's buffers are read-only
    return PreparedPrompt(token_ids, mrope, rope_delta, image_grids, image_token_spans, num_image_tokens)


def _check_grids(image_grids: list[ImageGrid], merge: int) -> list[ImageGrid]:
    grids = []
    for i, grid in enumerate(image_grids):
        t, h, w = (int(x) for x in grid)
        if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
            raise PromptError(f"image {i}: grid (t={t}, h={h}, w={w}) must be positive with h and w divisible by {merge}")
        grids.append((t, h, w))
    return grids


def mrope_positions(
    token_ids: list[int] | torch.Tensor, image_grids: list[ImageGrid], config: PromptConfig
) -> tuple[torch.Tensor, int]:
    """Qwen2.5-VL's 3-D rotary positions for one sequence: (LongTensor [3, L], rope_delta).

    Text tokens advance all three rows by one. An image block of grid (t, h, w) takes
    (t, h/merge, w/merge) merged tokens whose rows are (temporal, row, column) indices offset by
    the block's start position (temporal is 0 for still images); the text after it resumes at
    the block's largest position + 1. So a long image uses fewer positions than tokens, and
    rope_delta = max_position + 1 - L tells the decoder where generated tokens continue.
    Image blocks are consumed in order, each exactly as many tokens as its grid says.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    length = ids.numel()
    merge = config.spatial_merge_size
    grids = _check_grids(image_grids, merge)
    image_starts = _image_block_starts(ids, grids, config)

    pieces: list[torch.Tensor] = []
    next_pos = 0
    cursor = 0
    for start, (t, h, w) in zip(image_starts, grids):
        if start > cursor:
            pieces.append(torch.arange(next_pos, next_pos + start - cursor).expand(3, -1))
            next_pos += start - cursor
        gt, gh, gw = t, h // merge, w // merge
        temporal = torch.arange(gt).view(-1, 1, 1).expand(gt, gh, gw)
        rows = torch.arange(gh).view(1, -1, 1).expand(gt, gh, gw)
        cols = torch.arange(gw).view(1, 1, -1).expand(gt, gh, gw)
        block = torch.stack([temporal, rows, cols]).reshape(3, -1) + next_pos
        pieces.append(block)
        next_pos = int(block.max()) + 1
        cursor = start + gt * gh * gw
    if length > cursor:
        pieces.append(torch.arange(next_pos, next_pos + length - cursor).expand(3, -1))
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long), 0
    positions = torch.cat(pieces, dim=1).contiguous()
    rope_delta = int(positions.max()) + 1 - length
    return positions, rope_delta


def _image_block_starts(ids: torch.Tensor, grids: list[ImageGrid], config: PromptConfig) -> list[int]:
    """Start index of each image's placeholder run, checking the runs match the grids exactly."""
    is_image = ids == config.image_token_id
    expected = sum(config.image_token_count(g) for g in grids)
    found = int(is_image.sum())
    if found != expected:
        raise PromptError(
            f"the prompt has {found} image placeholder tokens but the {len(grids)} image(s) need {expected}"
        )
    starts = []
    image_positions = torch.nonzero(is_image).flatten().tolist()
    taken = 0
    for i, grid in enumerate(grids):
        count = config.image_token_count(grid)
        start = image_positions[taken]
        if image_positions[taken + count - 1] != start + count - 1:
            raise PromptError(f"image {i}: its {count} placeholder tokens are not contiguous")
        starts.append(start)
        taken += count
    return starts


class PromptBuilder:
    """Turns OpenAI-style chat messages or a plain completion prompt into a `PreparedPrompt`."""

    def __init__(self, tokenizer, config: PromptConfig):
        self.tokenizer = tokenizer
        self.config = config
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; a Qwen2.5-VL checkpoint ships one")
        # Control tokens (<|im_start|>, <|im_end|>, vision markers, ...): the tokenizer would turn them
        # into real control tokens if they appeared in message text, so chat text may not contain them.
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_tokens = tuple(sorted(
            {t for t in getattr(tokenizer, "all_special_tokens", ()) if t}
            | {tok.content for tok in added.values() if getattr(tok, "special", False) and tok.content}))
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """`tokenizer(text)["input_ids"]`. A `tokenizers`-backed tokenizer set up the way that call sets it
        (no truncation, no padding, special tokens kept whole) encodes through its Rust backend directly:
        the same ids without the wrapper's per-call argument handling, which cost more than the encoding."""
        b = self._backend
        if (b is not None and b.truncation is None and b.padding is None
                and b.encode_special_tokens == bool(getattr(self.tokenizer, "split_special_tokens", False))):
            return b.encode(text, add_special_tokens=add_special_tokens).ids
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "PromptBuilder":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return cls(tokenizer, PromptConfig.from_pretrained(model_dir))

    # ---- public API -------------------------------------------------------------------------

    def build_chat(
        self,
        messages: list[dict],
        image_grids: list[ImageGrid],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> PreparedPrompt:
        """Render `messages` with the checkpoint's template, expand image pads per grid, add M-RoPE.

        `image_grids[i]` is the (t, h, w) patch grid of the i-th image part, in message order.
        `tools` are OpenAI function tools, rendered by the template (engine/tools.py).
        """
        normalized, num_images = _normalize_messages(messages)
        tools = _normalize_tools(tools)
        self._reject_special_tokens(normalized)
        if num_images != len(image_grids):
            raise PromptError(
                f"the messages have {num_images} image part(s) but {len(image_grids)} image grid(s) were given"
            )
        grids = _check_grids(image_grids, self.config.spatial_merge_size)
        template = None
        uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in normalized)
        if uses_tools and not template_renders_tools(self.tokenizer.chat_template):
            template = TOOLS_CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template(
            normalized, tools=tools or None, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt)
        ids = self._encode(text, add_special_tokens=False)
        pad = self.config.image_token_id
        if ids.count(pad) != len(grids):
            raise PromptError(
                f"the chat template produced {ids.count(pad)} image placeholder(s) for {len(grids)} image part(s)"
            )
        token_ids: list[int] = []
        spans: list[tuple[int, int]] = []
        grid_iter = iter(grids)
        for tid in ids:
            if tid == pad:
                count = self.config.image_token_count(next(grid_iter))
                spans.append((len(token_ids), len(token_ids) + count))
                token_ids.extend([pad] * count)
            else:
                token_ids.append(tid)
        mrope, rope_delta = mrope_positions(token_ids, grids, self.config) if grids else (None, 0)
        return PreparedPrompt(
            token_ids=token_ids,
            mrope=mrope,
            rope_delta=rope_delta,
            image_grids=grids,
            image_token_spans=spans,
            num_image_tokens=sum(end - start for start, end in spans),
        )

    def build_text(self, prompt: str) -> PreparedPrompt:
        """Plain text for /v1/completions: tokenized as is, no template, no images."""
        if not isinstance(prompt, str):
            raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
        _reject_vision_tokens(prompt, "prompt")
        token_ids = self._encode(prompt, add_special_tokens=True)
        if not token_ids:
            raise PromptError("prompt is empty; give at least one token of text")
        return PreparedPrompt(token_ids=list(token_ids), mrope=None, rope_delta=0)

    def build_tokens(self, token_ids: list[int], vocab_size: int) -> PreparedPrompt:
        """Token ids for /v1/completions, used as given: each must be in [0, vocab_size) and none may be a
        vision token (a prompt given as ids has no images)."""
        if not token_ids:
            raise PromptError("prompt is empty; give at least one token id")
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise PromptError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        c = self.config
        vision = {c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id}
        found = sorted(vision.intersection(token_ids))
        if found:
            raise PromptError(f"prompt token ids {found} are vision tokens, which only an image part may place")
        return PreparedPrompt(token_ids=list(token_ids), mrope=None, rope_delta=0)

    def _reject_special_tokens(self, normalized: list[dict]) -> None:
        """Message text is text: a special token in it is refused (400 naming the message)."""
        for i, message in enumerate(normalized):
            content = message["content"]
            texts = ([(f"messages[{i}].content", content)] if isinstance(content, str) else
                     [(f"messages[{i}].content[{j}].text", p["text"]) for j, p in enumerate(content)
                      if p["type"] == "text"])
            for where, text in texts:
                if "<|" not in text and not any(t in text for t in self.special_tokens if not t.startswith("<|")):
                    continue
                for token in self.special_tokens:
                    if token in text:
                        raise PromptError(f"{where} contains the special token {token}, which only the chat "
                                          "template may place; remove it from the message text")

    @staticmethod
    def image_urls(messages: list[dict]) -> list[str]:
        """The `image_url.url` of every image part, in the order the images appear in the prompt."""
        normalized, _ = _normalize_messages(messages)
        return [
            part["image_url"]["url"]
            for message in normalized
            if isinstance(message["content"], list)
            for part in message["content"]
            if part["type"] == "image_url"
        ]


def _normalize_messages(messages: list[dict]) -> tuple[list[dict], int]:
    """Validate OpenAI chat messages and rebuild them with only the keys the template reads.

    Rebuilding means a stray key (say `image_url` on a text part) cannot change how the template
    renders a part. Returns the clean messages and the number of image parts.
    """
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list of {role, content} objects")
    normalized = []
    num_images = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise PromptError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        role = ROLE_ALIASES.get(role, role)
        if role not in CHAT_ROLES:
            raise PromptError(
                f"messages[{i}].role is {message.get('role')!r}; expected one of {', '.join(CHAT_ROLES)}"
            )
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if role == "tool" and isinstance(content, list):  # text parts of a tool result: one string
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise PromptError(f"messages[{i}].content: a tool message may only hold text")
            content = "".join(p["text"] for p in content)
        if isinstance(content, str):
            _reject_vision_tokens(content, f"messages[{i}].content")
            entry = {"role": role, "content": content}
            if role == "assistant" and message.get("tool_calls"):
                entry["tool_calls"] = _normalize_tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")
            normalized.append(entry)
            continue
        if not isinstance(content, list):
            raise PromptError(
                f"messages[{i}].content must be a string or a list of content parts, got {type(content).__name__}"
            )
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise PromptError(f"{where} must be an object with a 'type'")
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise PromptError(f"{where}.text must be a string")
                _reject_vision_tokens(text, f"{where}.text")
                parts.append({"type": "text", "text": text})
            elif kind == "image_url":
                if role != "user":
                    raise PromptError(f"{where}: image parts are only allowed in user messages, not {role!r}")
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str) or not url:
                    raise PromptError(f"{where}.image_url.url must be a non-empty string (http(s) or data: URL)")
                parts.append({"type": "image_url", "image_url": {"url": url}})
                num_images += 1
            else:
                raise PromptError(f"{where}.type is {kind!r}; supported part types are 'text' and 'image_url'")
        normalized.append({"role": role, "content": parts})
    return normalized, num_images


def _normalize_tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant turn's OpenAI tool calls as the template reads them: name + arguments object."""
    if not isinstance(calls, list):
        raise PromptError(f"{where} must be a list of tool calls")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise PromptError(f"{where}[{k}] must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError:
                raise PromptError(f"{where}[{k}].function.arguments is not valid JSON") from None
        if not isinstance(args, dict):
            raise PromptError(f"{where}[{k}].function.arguments must be a JSON object")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _normalize_tools(tools: Any) -> list[dict] | None:
    """OpenAI function tools, validated: [{"type": "function", "function": {"name", ...}}]."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise PromptError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise PromptError(f"tools[{k}] must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise PromptError(f"tools[{k}].function.name must be a non-empty string")
    return tools


def _reject_vision_tokens(text: str, where: str) -> None:
    """Literal vision special tokens in user text would become image placeholders with no image."""
    for token in VISION_SPECIAL_TOKENS:
        if token in text:
            raise PromptError(f"{where} contains the reserved token {token}; send images as image_url parts")
