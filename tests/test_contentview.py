"""The LLM stream contentview reassembles recorded Anthropic, OpenAI chat and Responses streams, cut or whole.

mitmproxy picks it automatically for `text/event-stream` bodies and leaves other bodies to its own views.
"""

from __future__ import annotations

import importlib

import pytest
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow, tutils

from metrion_addon import contentview
from metrion_addon.contentview import render_stream

ANTHROPIC = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_01","type":"message","role":"assistant",'
    b'"model":"claude-sonnet-4-20250514","content":[],"stop_reason":null,"usage":{"input_tokens":377,'
    b'"cache_creation_input_tokens":10,"cache_read_input_tokens":20,"output_tokens":1}}}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"User wants "}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"weather."}}\n\n'
    b"event: content_block_stop\n"
    b'data: {"type":"content_block_stop","index":0}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}\n\n'
    b"event: ping\n"
    b'data: {"type": "ping"}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Let me check.\\n"}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"text_delta","text":"One moment, caf\xc3\xa9."}}\n\n'
    b"event: content_block_stop\n"
    b'data: {"type":"content_block_stop","index":1}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01",'
    b'"name":"get_weather","input":{}}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":2,'
    b'"delta":{"type":"input_json_delta","partial_json":"{\\"city\\": "}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":2,'
    b'"delta":{"type":"input_json_delta","partial_json":"\\"Paris\\"}"}}\n\n'
    b"event: content_block_stop\n"
    b'data: {"type":"content_block_stop","index":2}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
    b'"usage":{"output_tokens":42}}\n\n'
    b"event: message_stop\n"
    b'data: {"type":"message_stop"}\n\n'
)

ANTHROPIC_VIEW = """\
model: claude-sonnet-4-20250514
api: anthropic
content:
  - index: 0
    type: thinking
    thinking: "User wants weather."
  - index: 1
    type: text
    text: |
      Let me check.
      One moment, café.
  - index: 2
    type: tool_use
    name: get_weather
    arguments: {"city": "Paris"}
stop_reason: tool_use
usage:
  input_tokens: 407
  output_tokens: 42
  cache_read_tokens: 20
  cache_write_tokens: 10
  reasoning_tokens: 0
  total_tokens: 449
events: 17
"""

_CHUNK = b'data: {"id":"chatcmpl-Bx","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06",'
OPENAI_CHAT = (
    _CHUNK + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}\n\n'
    b": keep-alive\n\n"
    + _CHUNK
    + b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}\n\n'
    + _CHUNK
    + b'"choices":[{"index":0,"delta":{"content":" there!"},"finish_reason":null}],"usage":null}\n\n'
    + _CHUNK
    + b'"choices":[{"index":1,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
    b'"function":{"name":"lookup","arguments":""}}]},"finish_reason":null}],"usage":null}\n\n'
    + _CHUNK
    + b'"choices":[{"index":1,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"q\\":"}}]},'
    b'"finish_reason":null}],"usage":null}\n\n'
    + _CHUNK
    + b'"choices":[{"index":1,"delta":{"tool_calls":[{"index":0,"function":{"arguments":" 1}"}}]},'
    b'"finish_reason":null}],"usage":null}\n\n'
    + _CHUNK
    + b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
    + _CHUNK
    + b'"choices":[{"index":1,"delta":{},"finish_reason":"tool_calls"}],"usage":null}\n\n'
    + _CHUNK
    + b'"choices":[],"usage":{"prompt_tokens":79,"completion_tokens":11,"total_tokens":90,'
    b'"prompt_tokens_details":{"cached_tokens":64},"completion_tokens_details":{"reasoning_tokens":3}}}\n\n'
    b"data: [DONE]\n\n"
)

OPENAI_CHAT_VIEW = """\
model: gpt-4o-2024-08-06
api: chat
choices:
  - index: 0
    text: "Hi there!"
    finish_reason: stop
  - index: 1
    tool_calls:
      - index: 0
        type: function
        name: lookup
        arguments: {"q": 1}
    finish_reason: tool_calls
usage:
  input_tokens: 79
  output_tokens: 11
  cache_read_tokens: 64
  cache_write_tokens: 0
  reasoning_tokens: 3
  total_tokens: 90
events: 10
"""

RESPONSES = (
    b"event: response.created\n"
    b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","status":"in_progress",'
    b'"model":"gpt-4.1-2025-04-14","usage":null}}\n\n'
    b"event: response.output_item.added\n"
    b'data: {"type":"response.output_item.added","output_index":0,"item":{"type":"reasoning","id":"rs_1"}}\n\n'
    b"event: response.reasoning_summary_text.delta\n"
    b'data: {"type":"response.reasoning_summary_text.delta","output_index":0,"delta":"Greet back."}\n\n'
    b"event: response.output_item.added\n"
    b'data: {"type":"response.output_item.added","output_index":1,"item":{"type":"message","id":"msg_1"}}\n\n'
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","output_index":1,"content_index":0,"delta":"Hi"}\n\n'
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","output_index":1,"content_index":0,"delta":"!"}\n\n'
    b"event: response.output_item.done\n"
    b'data: {"type":"response.output_item.done","output_index":1,"item":{"type":"message","status":"completed"}}\n\n'
    b"event: response.output_item.added\n"
    b'data: {"type":"response.output_item.added","output_index":2,"item":{"type":"function_call","name":"save",'
    b'"call_id":"call_9","arguments":""}}\n\n'
    b"event: response.function_call_arguments.delta\n"
    b'data: {"type":"response.function_call_arguments.delta","output_index":2,"delta":"{\\"ok\\": true}"}\n\n'
    b"event: response.completed\n"
    b'data: {"type":"response.completed","sequence_number":9,"response":{"id":"resp_1","status":"completed",'
    b'"model":"gpt-4.1-2025-04-14","usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},'
    b'"output_tokens":87,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":123}}}\n\n'
)

RESPONSES_VIEW = """\
model: gpt-4.1-2025-04-14
api: responses
output:
  - index: 0
    type: reasoning
    thinking: "Greet back."
  - index: 1
    type: message
    text: "Hi!"
    status: completed
  - index: 2
    type: function_call
    name: save
    arguments: {"ok": true}
status: completed
usage:
  input_tokens: 36
  output_tokens: 87
  cache_read_tokens: 0
  cache_write_tokens: 0
  reasoning_tokens: 64
  total_tokens: 123
events: 10
"""


@pytest.mark.parametrize(
    ("body", "expected"),
    [(ANTHROPIC, ANTHROPIC_VIEW), (OPENAI_CHAT, OPENAI_CHAT_VIEW), (RESPONSES, RESPONSES_VIEW)],
    ids=["anthropic", "openai-chat", "responses"],
)
def test_recorded_stream_renders_blocks_stop_reason_and_usage(body: bytes, expected: str) -> None:
    assert render_stream(body) == expected


@pytest.mark.parametrize("body", [ANTHROPIC, OPENAI_CHAT, RESPONSES], ids=["anthropic", "openai-chat", "responses"])
def test_crlf_line_ends_render_the_same(body: bytes) -> None:
    assert render_stream(body.replace(b"\n", b"\r\n")) == render_stream(body)


def test_anthropic_stream_cut_mid_event_shows_what_arrived_and_partial_usage() -> None:
    cut = ANTHROPIC.index(b'"partial_json":"\\"Paris')
    view = render_stream(ANTHROPIC[:cut])
    assert "text: |\n      Let me check.\n      One moment, café.\n" in view
    assert 'arguments: "{\\"city\\": "  # not valid JSON (cut?)' in view
    assert "stop_reason" not in view
    assert "usage:  # partial: the closing usage never arrived\n  input_tokens: 407\n  output_tokens: 1\n" in view
    assert "notes:\n  - stream ended mid-event (" in view


def test_openai_stream_cut_before_usage_chunk_says_usage_not_reported() -> None:
    cut = OPENAI_CHAT.index(b'"choices":[],"usage"') - 20
    view = render_stream(OPENAI_CHAT[:cut])
    assert 'text: "Hi there!"' in view
    assert "usage: not reported (stream cut?)\n" in view
    assert "stream ended mid-event" in view


def test_stream_ending_on_an_event_boundary_has_no_cut_note() -> None:
    view = render_stream(OPENAI_CHAT[: OPENAI_CHAT.index(b"data: [DONE]")])
    assert "notes:" not in view


@pytest.mark.parametrize(
    ("body", "note"),
    [
        (
            ANTHROPIC[: ANTHROPIC.index(b"event: content_block_start")]
            + b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n',
            'error event: "Overloaded"',
        ),
        (_CHUNK + b'"error":{"message":"server broke","type":"server_error"}}\n\n', 'error event: "server broke"'),
        (
            RESPONSES[: RESPONSES.index(b"event: response.output_item.added")]
            + b'event: error\ndata: {"type":"error","code":"x","message":"bad","sequence_number":1}\n\n',
            'error event: "bad"',
        ),
    ],
    ids=["anthropic", "openai-chat", "responses"],
)
def test_in_stream_error_event_is_noted(body: bytes, note: str) -> None:
    assert f"notes:\n  - {note}\n" in render_stream(body)


EMPTY_REPLY = "model: unknown\napi: chat\nchoices: []\nusage: not reported (stream cut?)\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", EMPTY_REPLY + "events: 0\n"),
        (b"data: [DONE]\n\n", EMPTY_REPLY + "events: 1\n"),
        (b": keep-alive\n\ndata: not json\n\ndata: [1, 2]\n\n", EMPTY_REPLY + "events: 2\n"),
    ],
    ids=["empty", "done-only", "not-llm-json"],
)
def test_streams_without_llm_events_render_an_empty_reply(body: bytes, expected: str) -> None:
    assert render_stream(body) == expected


@pytest.mark.parametrize("body", [ANTHROPIC, OPENAI_CHAT, RESPONSES], ids=["anthropic", "openai-chat", "responses"])
def test_a_cut_at_any_byte_still_renders(body: bytes) -> None:
    for cut in range(len(body)):
        assert render_stream(body[:cut]).endswith("\n"), cut


@pytest.mark.parametrize(
    ("content_type", "view_name"),
    [
        ("text/event-stream", "LLM stream"),
        ("text/event-stream; charset=utf-8", "LLM stream"),
        ("application/json", "JSON"),
    ],
)
def test_mitmproxy_picks_the_view_automatically_for_event_streams(content_type: str, view_name: str) -> None:
    body = ANTHROPIC if content_type.startswith("text/") else b'{"model": "x"}'
    with taddons.context():
        flow = tflow.tflow(resp=tutils.tresp(headers=http.Headers(content_type=content_type), content=body))
        result = contentviews.prettify_message(flow.response, flow)
    assert result.view_name == view_name
    if view_name == "LLM stream":
        assert result.text == ANTHROPIC_VIEW
        assert result.syntax_highlight == "yaml"


def test_reimporting_the_module_replaces_the_registered_view() -> None:
    importlib.reload(contentview)
    matching = [name for name in contentviews.registry if name == "llm stream"]
    assert matching == ["llm stream"]
    assert type(contentviews.registry["llm stream"]) is contentview.LLMStreamContentview


OPENAI_AS_THE_CLIENT_GOT_IT = (  # Metrion asked for usage and hid the usage-only chunk from the client
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":"Hi!"},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[{"index":0,'
    b'"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
    b"data: [DONE]\n\n"
)
METERED = {"provider": "openai", "model": "gpt-4o-2024-08-06", "input_tokens": 79, "output_tokens": 11,
           "cache_read_tokens": 0, "cache_write_tokens": 0, "reasoning_tokens": 0, "total_tokens": 90,
           "usage_source": "provider"}


def test_hidden_usage_chunk_shows_the_metered_usage_from_the_flow() -> None:
    with taddons.context():
        flow = tflow.tflow(resp=tutils.tresp(headers=http.Headers(content_type="text/event-stream"),
                                             content=OPENAI_AS_THE_CLIENT_GOT_IT))
        flow.metadata["metrion"] = METERED
        text = contentviews.prettify_message(flow.response, flow).text
    assert "usage:  # metered by Metrion from a usage chunk it asked for and hid from the client" in text
    assert "  input_tokens: 79\n  output_tokens: 11\n" in text and "  total_tokens: 90\n" in text
    assert "not reported" not in text
    assert "usage: not reported (stream cut?)" in render_stream(OPENAI_AS_THE_CLIENT_GOT_IT)  # nothing metered
    estimated = render_stream(OPENAI_AS_THE_CLIENT_GOT_IT, {**METERED, "usage_source": "estimated"})
    assert "usage: not reported (stream cut?)" in estimated  # only the provider's own numbers are shown as such


def test_gemini_native_stream_is_reassembled_with_its_usage_metadata() -> None:
    body = (
        b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":"Thinking...","thought":true}]},'
        b'"index":0}],"modelVersion":"gemini-2.5-flash","usageMetadata":{"promptTokenCount":9}}\r\n\r\n'
        b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":"Hello"}]},"finishReason":"STOP",'
        b'"index":0}],"modelVersion":"gemini-2.5-flash","usageMetadata":{"promptTokenCount":9,'
        b'"candidatesTokenCount":2,"thoughtsTokenCount":5,"totalTokenCount":16}}\r\n\r\n'
    )
    text = render_stream(body)
    assert text.startswith("model: gemini-2.5-flash\napi: gemini\ncandidates:\n")
    assert '    thinking: "Thinking..."\n    text: "Hello"\n    finishReason: STOP\n' in text
    assert "usage:\n  input_tokens: 9\n  output_tokens: 7\n" in text and "  reasoning_tokens: 5\n" in text
