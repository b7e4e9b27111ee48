"""What the engine hands back each step: per-request deltas, ready to stream."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), most likely first


@dataclass(slots=True)
class ChoiceDelta:
    """News for one of a request's n choices since the last step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    diagnostics: list[dict] | None = None  # optimal sampling: one dict per new token (alpha, ESS, KLs, logprobs)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    choices: list[ChoiceDelta] = field(default_factory=list)
    finished: bool = False  # every choice has finished
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0  # all choices, cumulative
    adapter: str | None = None
    adapter_version: int | None = None
    served_by: str | None = None  # which engine instance (the Decoder replica) produced it
    queue_time_s: float | None = None  # add_request -> first step that scheduled it (waiting queue + slot wait)
