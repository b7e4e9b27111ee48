"""A batch of /v1/completions prompts answered as one response.

Each prompt is its own Decoder request (n choices each); here their outputs become one stream of
RequestOutputs whose choice `i * n + j` is sample j of prompt i (OpenAI's and vLLM's numbering) and
whose token counts are the sums over the prompts, so the Ingress streams and records it like a
single request.
"""

from __future__ import annotations

import asyncio
import dataclasses

from vlora.engine.outputs import RequestOutput


class PromptBatch:
    """The prompts' latest token counts and finish states; `merge` renumbers one prompt's output."""

    def __init__(self, n: int, num_prompts: int):
        self.n = n
        self.prompt_tokens = [0] * num_prompts
        self.generated = [0] * num_prompts
        self.done = [False] * num_prompts

    def prompt_tokens_of(self, choice_index: int) -> int:
        return self.prompt_tokens[choice_index // self.n]

    def merge(self, i: int, out: RequestOutput) -> RequestOutput:
        self.prompt_tokens[i], self.generated[i], self.done[i] = (out.num_prompt_tokens, out.num_generated_tokens,
                                                                  out.finished)
        choices = [dataclasses.replace(c, index=c.index + i * self.n) for c in out.choices]
        return dataclasses.replace(out, choices=choices, finished=all(self.done),
                                   num_prompt_tokens=sum(self.prompt_tokens),
                                   num_generated_tokens=sum(self.generated))

    def merge_all(self, outs: list[RequestOutput]) -> RequestOutput:
        """One output from every prompt's (first or whole) output, in prompt order."""
        merged = [self.merge(i, out) for i, out in enumerate(outs)]
        last = merged[-1]
        return dataclasses.replace(last, choices=[c for m in merged for c in m.choices], finished=all(self.done))


class MergedStream(PromptBatch):
    """The prompts' Decoder streams as one, with the interface the Ingress uses on one stream
    (`__anext__`, `cancel`): items in arrival order, renumbered and summed."""

    def __init__(self, n: int, gens: list, firsts: list[RequestOutput]):
        super().__init__(n, len(gens))
        self.gens = gens
        self.first = self.merge_all(firsts)
        self._items: asyncio.Queue = asyncio.Queue()
        self._open = sum(1 for f in firsts if not f.finished)
        self._tasks = [asyncio.ensure_future(self._pump(i, g)) for i, (g, f) in enumerate(zip(gens, firsts))
                       if not f.finished]

    async def _pump(self, i: int, gen) -> None:
        try:
            while True:
                out = await gen.__anext__()
                self._items.put_nowait((i, out, None))
                if out.finished:
                    break
        except StopAsyncIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - re-raised to the reader, as one stream would
            self._items.put_nowait((i, None, exc))
            return
        self._items.put_nowait((i, None, None))  # this prompt's stream ended

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._open == 0:
                raise StopAsyncIteration
            i, out, exc = await self._items.get()
            if exc is not None:
                raise exc
            if out is None:
                self._open -= 1
                self.done[i] = True
                continue
            return self.merge(i, out)

    def cancel(self) -> None:
        for t in self._tasks:
            t.cancel()
        for g in self.gens:
            g.cancel()
