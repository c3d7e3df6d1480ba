"""Hostile fuzzing: the schema fuzz (test_server_fuzz.py) draws only valid Unicode and short lists,
and passed while lone surrogates crashed the server. Here hypothesis takes a valid request body
for each operation and replaces one field (every declared field, a nested message field, or an
unknown extra) with a hostile value: lone surrogates, control characters, huge strings and lists,
deep nesting, numbers at the edges of every type, wrong types. The body is sent as raw JSON to a
real server on the reference engine.

Every answer must be a 2xx or a 4xx in OpenAI's error shape (a 504 is the documented answer to a
request that outlives --request-timeout); never a 5xx, never a body that breaks the schema.
A bounded run is in the default suite; `-m slow` runs twenty times as many examples.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
)
from server.protocol_misc import DetokenizeRequest, DetokenizeResponse, TokenizeCompletionRequest, TokenizeResponse
from server_harness import API_KEY, ServerThread, start_server

EXAMPLES = 60  # per operation in the default suite
SLOW_EXAMPLES = 1200

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
EDGE_NUMBERS: list[Any] = [0, -1, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**200, -(2**200),
                           1e308, -1e308, 5e-324, -0.0, 0.5, 1e-12, True, False]


class DeepJSON:
    """JSON nested `depth` levels deep, written as text (Python's encoder and hypothesis's printer
    would recurse on such a value)."""

    def __init__(self, depth: int, leaf: str, as_dict: bool) -> None:
        self.depth, self.leaf, self.as_dict = depth, leaf, as_dict

    def text(self) -> str:
        opened, closed = ('{"a":', "}") if self.as_dict else ("[", "]")
        return opened * self.depth + json.dumps(self.leaf) + closed * self.depth

    def __repr__(self) -> str:
        return f"DeepJSON({self.depth}, {self.leaf!r}, as_dict={self.as_dict})"


PLACEHOLDER = "__chorus_deep_json__"


hostile_text = st.one_of(
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), st.sampled_from(SURROGATES), st.text(max_size=4)),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=31), min_size=1, max_size=16),
    st.sampled_from(["", " ", "\x00", "\u202e", "\ufeff", "\U0010ffff", "a" * 200_000, "<|endoftext|>" * 50]),
)
hostile_value = st.one_of(
    hostile_text,
    st.sampled_from(EDGE_NUMBERS),
    st.sampled_from([None, {}, [], [[]], {"": None}]),
    st.builds(lambda v, n: [v] * n, st.sampled_from(["a", "\ud800", 1, -1, None, 2**70, "", [1]]),
              st.sampled_from([2, 1_000, 100_000])),
    st.builds(DeepJSON, st.sampled_from([64, 3_000, 60_000]), st.sampled_from(["x", "\ud800"]), st.booleans()),
    st.dictionaries(hostile_text, st.sampled_from(EDGE_NUMBERS), max_size=3),
)

OPERATIONS: dict[str, tuple[dict, type, type]] = {
    "/v1/completions": ({"prompt": "Hello", "max_tokens": 2}, CompletionRequest, CompletionResponse),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                             ChatCompletionRequest, ChatCompletionResponse),
    "/tokenize": ({"prompt": "Hello"}, TokenizeCompletionRequest, TokenizeResponse),
    "/detokenize": ({"tokens": [1, 2]}, DetokenizeRequest, DetokenizeResponse),
}


def _targets(path: str) -> list[str]:
    """Where a hostile value may go: every declared field, nested message fields, an unknown one."""
    base, model, _ = OPERATIONS[path]
    names = sorted(model.model_fields) + ["x_unknown_extra"]
    if path == "/v1/chat/completions":
        names += ["messages.0.content", "messages.0.role", "messages.0.name", "messages.0.content.0"]
    return names


def _mutated(path: str, target: str, value: Any) -> dict:
    body = json.loads(json.dumps(OPERATIONS[path][0]))
    if target.startswith("messages.0."):
        field = target.split(".")[2]
        if target.endswith(".0"):  # a content part
            body["messages"][0]["content"] = [{"type": "text", "text": value}]
        else:
            body["messages"][0][field] = value
    else:
        body[target] = value
    if body.get("stream") is True:  # streams are checked by status; keep them short
        body["max_tokens"] = 1
    return body


@pytest.fixture(scope="module")
def hostile_server(server_ensemble: Path) -> Iterator[ServerThread]:
    yield from start_server(server_ensemble, engine="torch", api_key=API_KEY, max_model_len=32, max_queue=4,
                            request_timeout=5.0, max_refusals=0)  # every hostile body must reach the validators


def _encode(body: dict) -> bytes:
    """The body as JSON text (lone surrogates become escapes, as a hostile client sends them)."""
    deep: list[DeepJSON] = []

    def default(value: Any) -> str:
        deep.append(value)
        return PLACEHOLDER

    text = json.dumps(body, default=default)
    for value in deep:
        text = text.replace(json.dumps(PLACEHOLDER), value.text(), 1)
    return text.encode()


def _check(http: httpx.Client, path: str, body: dict) -> None:
    raw = _encode(body)
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    shown = raw[:200]
    assert r.status_code < 500 or r.status_code == 504, f"{r.status_code} for {shown!r}: {r.text[:300]}"
    if r.status_code >= 400:
        ErrorResponse.model_validate(r.json())
    elif r.headers["content-type"].startswith("application/json"):
        OPERATIONS[path][2].model_validate(r.json())
    else:
        assert r.headers["content-type"].startswith("text/event-stream") and r.text.rstrip().endswith("[DONE]")


def _run(server: ServerThread, path: str, examples: int) -> None:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        @given(target=st.sampled_from(_targets(path)), value=hostile_value)
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        def check(target: str, value: Any) -> None:
            _check(http, path, _mutated(path, target, value))

        check()
    assert httpx.get(f"{server.url}/health").status_code == 200  # and the server is still fine


@pytest.mark.parametrize("path", sorted(OPERATIONS))
def test_hostile_values_in_any_field_get_no_5xx(hostile_server: ServerThread, path: str) -> None:
    _run(hostile_server, path, EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(OPERATIONS))
def test_hostile_values_long_run(hostile_server: ServerThread, path: str) -> None:
    _run(hostile_server, path, SLOW_EXAMPLES)
