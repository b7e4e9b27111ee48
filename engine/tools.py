"""Tool calling in Qwen2.5's format: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

The checkpoint's chat template renders the tools into the system turn, assistant tool calls and
`tool` results (Qwen2.5-Instruct's template does). Qwen2.5-VL-Instruct's shipped template has no
tools section, so for a template that never mentions `tools` the same conversation is rendered
with `TOOLS_CHAT_TEMPLATE`: Qwen2.5-VL's template plus Qwen2.5-Instruct's tool parts. Without
tools it renders exactly as the VL template does.

Parsing the model's text back into OpenAI `tool_calls` is here too, so the API layer and the
trainer share one definition of the format.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from vlora.engine.tiny import QWEN2_5_VL_MESSAGE

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# NOTE: HF renders templates with trim_blocks, which drops a newline right after a {% tag %};
# newlines that follow a tag are therefore written as {{ '\n' }} expressions.
TOOLS_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{% if messages[0]['content'] is string %}{{ messages[0]['content'] }}"
    "{% else %}{% for content in messages[0]['content'] %}{{ content['text'] }}{% endfor %}{% endif %}"
    "{% else %}You are a helpful assistant.{% endif %}"
    "{{ '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and not tools %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% if message['role'] == 'system' and tools %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "<|im_start|>assistant{% if message['content'] %}{{ '\\n' + message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] %}"
    "{% if call['function'] is defined %}{% set call = call['function'] %}{% endif %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' + (call['arguments'] | tojson)"
    " + '}\\n</tool_call>' }}"
    "{% endfor %}<|im_end|>\n"
    "{% else %}"
    + QWEN2_5_VL_MESSAGE +
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def template_renders_tools(template: str) -> bool:
    return "tools" in template and "tool_call" in template


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # the JSON text of the arguments object, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = "call_" + uuid.uuid4().hex[:24]

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.S)


def parse_call(body: str) -> ToolCall | None:
    """One `<tool_call>` body -> ToolCall, or None if it is not {"name": str, "arguments": object}."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some fine-tunes write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content outside the calls or None, the well-formed calls) of a model's text.

    A `<tool_call>` block that does not hold a valid call stays in the content, as text.
    """
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        call = parse_call(m.group(1).strip())
        if call is None:
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    content = "".join(kept).strip() if calls else text
    return (content or None) if calls else text, calls


class ToolCallStream:
    """Splits streamed text into content deltas and whole tool calls, as they complete.

    Text that could be the start of `<tool_call>` is held back until it is known not to be; a
    call's text is held until its `</tool_call>`; a block that does not parse is released as text.
    """

    def __init__(self):
        self.buffer = ""
        self.num_calls = 0

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        out, calls = "", []
        while self.buffer:
            start = self.buffer.find(TOOL_CALL_START)
            if start < 0:
                keep = _partial_prefix(self.buffer, TOOL_CALL_START)
                out += self.buffer[:len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            out += self.buffer[:start]
            self.buffer = self.buffer[start:]
            end = self.buffer.find(TOOL_CALL_END)
            if end < 0:
                break
            block = self.buffer[:end + len(TOOL_CALL_END)]
            self.buffer = self.buffer[len(block):]
            call = parse_call(block[len(TOOL_CALL_START):-len(TOOL_CALL_END)].strip())
            if call is None:
                out += block
            else:
                calls.append(call)
                self.num_calls += 1
        if self.num_calls and not out.strip():
            out = ""  # the newlines between calls are not content
        return out, calls

    def flush(self) -> str:
        """What is left at the end (an unclosed call is text)."""
        rest, self.buffer = self.buffer, ""
        return "" if self.num_calls and not rest.strip() else rest


def _partial_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
