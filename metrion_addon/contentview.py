"""A mitmproxy contentview for LLM `text/event-stream` bodies: the reassembled text of each block and the usage.

`render_stream` is the pure renderer; importing this module registers `LLMStreamContentview` (same name replaces).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from mitmproxy import contentviews

from .sse import SSEDecoder
from .usage import StreamUsage, Usage

_ANTHROPIC_TYPES = frozenset(
    {"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta"}
)
# dialect -> (StreamUsage provider, api, name of the block list, name of a block's stop, name of the stream's stop)
_DIALECTS = {
    "anthropic": ("anthropic", "messages", "content", "stop", "stop_reason"),
    "responses": ("openai", "responses", "output", "status", "status"),
    "chat": ("openai", "chat", "choices", "finish_reason", "finish_reason"),
    "gemini": ("gemini", "generate", "candidates", "finishReason", "finishReason"),
}
_USAGE_FIELDS = (*(f.name for f in fields(Usage)), "total_tokens")


@dataclass
class _Block:
    type: str | None = None
    name: str | None = None
    thinking: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    arguments: list[str] | None = None  # None: not a tool call
    stop: str | None = None
    tool_calls: dict[int, _Block] = field(default_factory=dict)

    def add(self, *, text: object = None, thinking: object = None, arguments: object = None) -> None:
        if isinstance(text, str):
            self.text.append(text)
        if isinstance(thinking, str):
            self.thinking.append(thinking)
        if isinstance(arguments, str):
            self.arguments = [*(self.arguments or ()), arguments]


@dataclass
class _Reply:
    blocks: dict[int, _Block] = field(default_factory=dict)
    stop: str | None = None

    def block(self, index: object) -> _Block:
        return self.blocks.setdefault(_index(index, 0), _Block())


def _index(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _dicts(value: object) -> list[dict]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _dialect(payloads: list[dict]) -> str:
    for data in payloads:
        kind = data.get("type")
        if kind in _ANTHROPIC_TYPES:
            return "anthropic"
        if isinstance(kind, str) and kind.startswith("response."):
            return "responses"
        if "candidates" in data or "usageMetadata" in data:
            return "gemini"
    return "chat"


def _fold_anthropic(reply: _Reply, data: dict) -> None:
    kind = data.get("type")
    if kind == "content_block_start":
        start = _dict(data.get("content_block"))
        block = reply.block(data.get("index"))
        block.type, block.name = _str(start.get("type")), _str(start.get("name"))
        block.add(text=start.get("text") or None, thinking=start.get("thinking") or None)
        if block.name:
            block.add(arguments="")
    elif kind == "content_block_delta":
        delta = _dict(data.get("delta"))
        reply.block(data.get("index")).add(
            text=delta.get("text"), thinking=delta.get("thinking"), arguments=delta.get("partial_json")
        )
    elif kind == "message_delta":
        reply.stop = _str(_dict(data.get("delta")).get("stop_reason")) or reply.stop


def _fold_responses(reply: _Reply, data: dict) -> None:
    kind = data.get("type")
    kind = kind if isinstance(kind, str) else ""
    delta = data.get("delta")
    if isinstance(response := data.get("response"), dict):
        reply.stop = _str(response.get("status")) or reply.stop
    elif kind == "response.output_item.added":
        item = _dict(data.get("item"))
        block = reply.block(data.get("output_index"))
        block.type, block.name = _str(item.get("type")), _str(item.get("name"))
        if block.type == "function_call":
            block.add(arguments="")
    elif kind == "response.output_item.done":
        reply.block(data.get("output_index")).stop = _str(_dict(data.get("item")).get("status"))
    elif kind in ("response.output_text.delta", "response.refusal.delta"):
        reply.block(data.get("output_index")).add(text=delta)
    elif kind.startswith("response.reasoning") and kind.endswith(".delta"):  # reasoning_text and reasoning_summary
        reply.block(data.get("output_index")).add(thinking=delta)
    elif kind == "response.function_call_arguments.delta":
        reply.block(data.get("output_index")).add(arguments=delta)


def _fold_chat(reply: _Reply, data: dict) -> None:
    for choice in _dicts(data.get("choices")):
        block = reply.block(choice.get("index"))
        delta = _dict(choice.get("delta"))
        block.add(text=delta.get("content"), thinking=delta.get("reasoning_content") or delta.get("reasoning"))
        for call in _dicts(delta.get("tool_calls")):
            tool = block.tool_calls.setdefault(_index(call.get("index"), len(block.tool_calls)), _Block())
            function = _dict(call.get("function"))
            tool.type = _str(call.get("type")) or tool.type
            tool.name = _str(function.get("name")) or tool.name
            tool.add(arguments=function.get("arguments") or "")
        block.stop = _str(choice.get("finish_reason")) or block.stop


def _fold_gemini(reply: _Reply, data: dict) -> None:
    for candidate in _dicts(data.get("candidates")):
        block = reply.block(candidate.get("index"))
        for part in _dicts(_dict(candidate.get("content")).get("parts")):
            if part.get("thought") is True:
                block.add(thinking=part.get("text"))
            else:
                block.add(text=part.get("text"))
            if call := _dict(part.get("functionCall")):
                tool = block.tool_calls.setdefault(len(block.tool_calls), _Block(type="functionCall"))
                tool.name = _str(call.get("name"))
                tool.add(arguments=json.dumps(call.get("args") or {}, ensure_ascii=False))
        block.stop = _str(candidate.get("finishReason")) or block.stop


_FOLDS = {"anthropic": _fold_anthropic, "responses": _fold_responses, "chat": _fold_chat, "gemini": _fold_gemini}


def _text_lines(pad: str, key: str, text: str) -> list[str]:
    if "\n" not in text:
        return [f"{pad}{key}: {json.dumps(text, ensure_ascii=False)}"]
    return [f"{pad}{key}: |", *(f"{pad}  {line}" if line else "" for line in text.split("\n"))]


def _arguments(raw: str) -> str:
    try:
        return json.dumps(json.loads(raw), ensure_ascii=False)
    except (ValueError, RecursionError):
        return json.dumps(raw, ensure_ascii=False) + ("  # not valid JSON (cut?)" if raw else "")


def _block_lines(index: int, block: _Block, stop_key: str, pad: str) -> list[str]:
    lines = [f"{pad}- index: {index}"]
    pad += "  "
    lines += [f"{pad}{key}: {value}" for key, value in (("type", block.type), ("name", block.name)) if value]
    for key, parts in (("thinking", block.thinking), ("text", block.text)):
        if parts:
            lines += _text_lines(pad, key, "".join(parts))
    if block.arguments is not None:
        lines.append(f"{pad}arguments: {_arguments(''.join(block.arguments))}")
    if block.tool_calls:
        lines.append(f"{pad}tool_calls:")
        for tool_index, tool in sorted(block.tool_calls.items()):
            lines += _block_lines(tool_index, tool, stop_key, pad + "  ")
    if block.stop:
        lines.append(f"{pad}{stop_key}: {block.stop}")
    return lines


def render_stream(data: bytes, metered: Mapping[str, Any] | None = None) -> str:
    """A recorded LLM SSE body as YAML-ish text: model, each block's text, stop reason, usage, notes, event count.

    `metered` is the flow's `metadata["metrion"]`: when the body the client got has no usage but Metrion metered
    the provider's own, it came from the usage chunk Metrion asked for and hid from the client; show that.
    """
    decoder = SSEDecoder()
    events = decoder.feed(data)
    cut = len(decoder.pending)  # bytes after the last complete event: the stream ended mid-event
    events += decoder.close()
    events = [event for event in events if event.data is not None]
    payloads: list[dict] = []
    for event in events:
        try:
            parsed = json.loads(event.data or "")
        except (ValueError, RecursionError):
            continue  # [DONE] and other non-JSON data
        if isinstance(parsed, dict):
            payloads.append(parsed)

    dialect = _dialect(payloads)
    provider, api, section, block_stop, stream_stop = _DIALECTS[dialect]
    tracker, reply = StreamUsage(provider, api), _Reply()
    for event in events:
        tracker.feed(event)
    for payload in payloads:
        _FOLDS[dialect](reply, payload)

    lines = [
        f"model: {tracker.model or 'unknown'}",
        f"api: {dialect}",
        f"{section}:" if reply.blocks else f"{section}: []",
    ]
    for index, block in sorted(reply.blocks.items()):
        lines += _block_lines(index, block, block_stop, "  ")
    if reply.stop:
        lines.append(f"{stream_stop}: {reply.stop}")
    if (usage := tracker.usage) is None and metered and metered.get("usage_source") == "provider":
        lines.append("usage:  # metered by Metrion from a usage chunk it asked for and hid from the client")
        lines += [f"  {name}: {metered.get(name, 0)}" for name in _USAGE_FIELDS]
    elif usage is None:
        lines.append("usage: not reported (stream cut?)")
    else:
        lines.append("usage:" if tracker.final else "usage:  # partial: the closing usage never arrived")
        lines += [f"  {name}: {getattr(usage, name)}" for name in _USAGE_FIELDS]
    notes = [f"stream ended mid-event ({cut} bytes after the last complete event)"] if cut else []
    if tracker.error:
        notes.append(f"error event: {json.dumps(tracker.error, ensure_ascii=False)}")
    if notes:
        lines += ["notes:", *(f"  - {note}" for note in notes)]
    lines.append(f"events: {len(events)}")
    return "\n".join(lines) + "\n"


class LLMStreamContentview(contentviews.Contentview):
    name = "LLM stream"
    syntax_highlight = "yaml"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        flow = metadata.flow
        metered = flow.metadata.get("metrion") if flow is not None else None
        return render_stream(data, metered if isinstance(metered, dict) else None)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        return 2 if (metadata.content_type or "").startswith("text/event-stream") else -1


contentviews.add(LLMStreamContentview)
