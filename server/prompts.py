"""Prompts to token ids: plain prompts in the four OpenAI forms, and chat messages rendered with
the ensemble tokenizer's chat template.

Tokenizer work runs on one dedicated thread (`Tokenization`), so long prompts do not stall the
event loop and the (not thread-safe) fast tokenizer is never used from two threads at once.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from server.errors import bad_request
from server.protocol import ChatMessageParam
from server.sampling import check_token_ids

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
        if msg.tool_call_id is not None:
            item["tool_call_id"] = msg.tool_call_id
        out.append(item)
    return out


class Tokenization:
    """Tokenizer calls for the server, serialised on one worker thread."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chorus-tokenizer")
        self._token_strs: dict[int, str] = {}

    def close(self) -> None:
        """Stop the worker thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    @property
    def vocab_len(self) -> int:
        """Number of ids the tokenizer can decode."""
        return len(self.tokenizer)

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`."""
        return await self._run(lambda: list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens)))

    async def decode(self, ids: list[int]) -> str:
        """Text of `ids` (special tokens kept, as vLLM's /detokenize does)."""
        return await self._run(lambda: self.tokenizer.decode(ids))

    async def completion_prompts(self, prompt: Any, add_special_tokens: bool, vocab_size: int) -> list[Prompt]:
        """The prompts of a /v1/completions body: a string, strings, token ids, or lists of ids.

        Token ids are checked against `vocab_size` before anything decodes them (400 otherwise).
        """
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for item in prompt:
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
    ) -> str:
        """The chat prompt text, rendered by the tokenizer's (or the request's) chat template."""
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

        def render() -> str:
            return self.tokenizer.apply_chat_template(
                conversation,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
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
