"""Prompts to token ids: plain prompts in the four OpenAI forms, and chat messages rendered with
the ensemble tokenizer's chat template.

Tokenizer work runs on a few dedicated threads (`Tokenization`), so long prompts do not stall the
event loop, and one huge prompt does not hold every other request's tokenization behind it. Each
thread has its own copy of the tokenizer (a fast tokenizer must not be used from two threads at
once). The backlog is bounded: past `max_pending` jobs waiting, new ones get a 429 instead of a
place in an ever longer line.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from server.errors import APIError, bad_request
from server.protocol import ChatMessageParam, prompt_items
from server.protocol_tools import ToolCallParam
from server.sampling import check_token_ids

log = logging.getLogger("chorus.server")

# Keys of apply_chat_template that chat_template_kwargs may not override.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


@dataclass(frozen=True)
class Prompt:
    """One prompt: its token ids and its text (for `echo`)."""

    token_ids: list[int]
    text: str


def flatten_messages(messages: list[ChatMessageParam]) -> list[dict[str, Any]]:
    """OpenAI messages as the plain dicts chat templates expect (text parts joined by newlines)."""
    out = []
    for i, msg in enumerate(messages):
        content = msg.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"messages[{i}].content[{j}] has type {part.type!r}: only text parts are supported",
                        param=f"messages[{i}].content",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        item: dict[str, Any] = {"role": msg.role, "content": content if content is not None else ""}
        if msg.name is not None:
            item["name"] = msg.name
        if msg.tool_calls:
            item["tool_calls"] = [_template_tool_call(call) for call in msg.tool_calls]
        if msg.tool_call_id is not None:
            item["tool_call_id"] = msg.tool_call_id
        out.append(item)
    return out


def _template_tool_call(call: ToolCallParam) -> dict[str, Any]:
    """An earlier tool call as chat templates take it: `arguments` as an object, not JSON text
    (the Transformers convention vLLM follows; text that is not a JSON object becomes {})."""
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            arguments = {}
    if not isinstance(arguments, dict):
        arguments = {}
    return {"id": call.id, "type": call.type, "function": {"name": call.function.name, "arguments": arguments}}


class Tokenization:
    """Tokenizer calls for the server, on `workers` threads with a tokenizer copy each."""

    def __init__(self, tokenizer: Any, workers: int = 2, max_pending: int = 256) -> None:
        self.tokenizer = tokenizer  # the event loop's own (token strings for logprobs)
        self.max_pending = max_pending
        self._pending = 0
        self.jobs = 0  # tokenizer jobs started (tests check that refused requests start none)
        self._local = threading.local()
        try:
            copies: list[Any] = [copy.deepcopy(tokenizer) for _ in range(workers)]
        except Exception:  # noqa: BLE001 - a tokenizer that cannot be copied gets one thread
            log.warning("the tokenizer cannot be copied: tokenizing on one thread", exc_info=True)
            copies = [tokenizer]
        self._copies = queue.SimpleQueue()
        for c in copies:
            self._copies.put(c)
        self._pool = ThreadPoolExecutor(max_workers=len(copies), thread_name_prefix="chorus-tokenizer",
                                        initializer=self._take_copy)
        self._token_strs: dict[int, str] = {}

    def _take_copy(self) -> None:
        self._local.tokenizer = self._copies.get_nowait()

    def close(self) -> None:
        """Stop the worker threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn):
        """Run `fn(tokenizer)` on a worker with that worker's tokenizer."""
        if self._pending >= self.max_pending:
            raise APIError(429, f"the server is busy tokenizing ({self._pending} jobs waiting); retry later",
                           code="tokenizer_busy", headers={"Retry-After": "1"})
        self._pending += 1
        self.jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: fn(self._local.tokenizer))
        finally:
            self._pending -= 1

    @property
    def vocab_len(self) -> int:
        """Number of ids the tokenizer can decode."""
        return len(self.tokenizer)

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`."""
        return await self._run(lambda tok: list(tok.encode(text, add_special_tokens=add_special_tokens)))

    async def decode(self, ids: list[int]) -> str:
        """Text of `ids` (special tokens kept, as vLLM's /detokenize does)."""
        return await self._run(lambda tok: tok.decode(ids))

    async def completion_prompts(self, prompt: Any, add_special_tokens: bool, vocab_size: int) -> list[Prompt]:
        """The prompts of a /v1/completions body: a string, strings, token ids, or lists of ids.

        Token ids are checked against `vocab_size` before anything decodes them (400 otherwise).
        """
        out = []
        for item in prompt_items(prompt):
            if isinstance(item, str):
                ids = await self.encode(item, add_special_tokens)
                if not ids:
                    raise bad_request("the prompt tokenizes to no tokens", param="prompt")
                out.append(Prompt(ids, item))
            else:
                ids = [int(t) for t in item]
                check_token_ids(ids, vocab_size, "prompt")
                out.append(Prompt(ids, await self.decode(ids) if ids else ""))
        return out

    async def render_chat(
        self,
        messages: list[ChatMessageParam],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        chat_template: str | None,
        chat_template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The chat prompt text, rendered by the tokenizer's (or the request's) chat template;
        `tools` (OpenAI's tool objects) are the template's `tools` variable."""
        if add_generation_prompt and continue_final_message:
            raise bad_request(
                "'add_generation_prompt' and 'continue_final_message' cannot both be true "
                "(send add_generation_prompt: false to continue the final message)",
                param="continue_final_message",
            )
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(
                "this ensemble's tokenizer has no chat template: use /v1/completions",
                param="messages",
            )
        kwargs = dict(chat_template_kwargs or {})
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs))
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}",
                              param="chat_template_kwargs")
        conversation = flatten_messages(messages)
        if continue_final_message and conversation[-1]["role"] != "assistant":
            raise bad_request("'continue_final_message' needs the last message to be from the assistant",
                              param="continue_final_message")

        def render(tok: Any) -> str:
            return tok.apply_chat_template(
                conversation,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                tools=tools,
                **kwargs,
            )

        try:
            text = await self._run(render)
        except Exception as err:  # jinja errors, raise_exception() in templates, bad roles, ...
            raise bad_request(f"cannot apply the chat template: {type(err).__name__}: {err}",
                              param="messages") from None
        if not isinstance(text, str):
            raise bad_request("the chat template did not render to text", param="messages")
        return text

    def token_str(self, token_id: int) -> str:
        """The text of one token on its own (cached)."""
        s = self._token_strs.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id])
            if len(self._token_strs) < 500_000:
                self._token_strs[token_id] = s
        return s

    def token_strs(self, ids: list[int]) -> list[str]:
        """Each token's own text (vLLM's `token_strs` of /tokenize use the raw vocabulary pieces)."""
        return list(self.tokenizer.convert_ids_to_tokens(ids))
