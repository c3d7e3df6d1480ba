"""What a running server knows: the engine once loaded, and everything derived from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ensemble.protocol import Engine
from server.client_budgets import ClientBudgets
from server.config import ServerConfig
from server.errors import APIError, engine_dead_error
from server.limits import Admission
from server.logprobs import TokenNamer
from server.metrics import ServerMetrics
from server.prompts import Tokenization
from server.sampling import member_names

if TYPE_CHECKING:
    from server.generation import GenerationCall

log = logging.getLogger("chorus.server")


@dataclass
class Ready:
    """The parts that exist once the engine has loaded."""

    engine: Engine
    model_name: str
    max_model_len: int
    vocab_size: int
    members: list[str]
    tokenization: Tokenization
    admission: Admission
    metrics: ServerMetrics
    servable_members: list[str] = field(default_factory=list)  # members a request may name as its model
    # Each client's own admission, taken before the server's (server.client_budgets).
    client_budgets: ClientBudgets = field(default_factory=lambda: ClientBudgets((), 0))
    _token_bytes: list[bytes | None] | None = None

    def answered_as(self, model: str | None) -> str:
        """The `model` of a response to a request that named `model`: the member it asked for
        alone, else the ensemble's served name."""
        return model if model is not None and model in self.servable_members else self.model_name

    def token_bytes_table(self) -> list[bytes | None]:
        """Each id's bytes (built on first use: it takes a few seconds for a large vocabulary)."""
        if self._token_bytes is None:
            from ensemble.vocab import token_bytes_table

            try:
                self._token_bytes = list(token_bytes_table(self.tokenization.tokenizer).entries)
            except Exception:  # noqa: BLE001 - no fast backend: fall back to the UTF-8 of the text
                log.warning("cannot read token bytes from the tokenizer; logprob bytes are the UTF-8 of the text")
                self._token_bytes = []
        return self._token_bytes

    def namer(self, as_ids: bool = False) -> TokenNamer:
        """Token naming for logprobs responses."""

        def token_bytes(token_id: int) -> bytes:
            table = self.token_bytes_table()
            entry = table[token_id] if token_id < len(table) else None
            return entry if entry is not None else self.tokenization.token_str(token_id).encode("utf-8")

        return TokenNamer(self.tokenization.token_str, token_bytes, as_ids)


@dataclass
class ServerState:
    """Mutable server state, kept on `app.state.chorus`."""

    config: ServerConfig
    ready: Ready | None = None
    load_error: str | None = None
    engine_dead: str | None = None  # why the loaded engine stopped serving (see server.app's watchdog)
    draining: bool = False
    calls: dict[str, GenerationCall] = field(default_factory=dict)
    background: list = field(default_factory=list)  # tasks kept alive until shutdown

    def begin_drain(self) -> None:
        """Refuse new requests (503) and label in-flight ones as stopped by the shutdown."""
        self.draining = True
        for call in list(self.calls.values()):
            call.mark_closing("shutdown")

    async def abort_all(self, reason: str) -> int:
        """Abort every call in flight (their responses end with a 503 / an error event)."""
        import asyncio

        calls = list(self.calls.values())
        for call in calls:
            call.mark_closing(reason)
        await asyncio.gather(*(call.close(reason) for call in calls), return_exceptions=True)
        return len(calls)

    def require_ready(self) -> Ready:
        """The loaded engine, or a 503 saying why there is none."""
        if self.engine_dead is not None:
            raise engine_dead_error(self.engine_dead)
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.ready is None:
            if self.load_error:
                raise APIError(503, f"the engine failed to load: {self.load_error}", code="engine_failed")
            raise APIError(503, "the engine is still loading; retry shortly", code="engine_loading",
                           headers={"Retry-After": "5"})
        return self.ready

    def check_model(self, ready: Ready, model: str | None) -> str | None:
        """The member a request names as its model (served alone), None for the ensemble (or no
        model); 404 when it names a model this server does not serve."""
        if model is None or model == ready.model_name:
            return None
        if model in ready.servable_members:
            return model
        served = ", ".join(f"`{m}`" for m in [ready.model_name, *ready.servable_members])
        raise APIError(404, f"The model `{model}` does not exist; this server serves {served}.",
                       param="model", code="model_not_found")


def build_ready(config: ServerConfig, engine: Engine) -> Ready:
    """Everything derived from a freshly loaded engine."""
    from server.engines import engine_max_running

    tokenizer = engine.tokenizer
    max_model_len = int(engine.max_model_len)
    if config.max_model_len is not None:
        if config.max_model_len > max_model_len:
            raise ValueError(f"--max-model-len {config.max_model_len} exceeds the engine's {max_model_len}")
        max_model_len = config.max_model_len
    if config.tool_call_parser:  # (ServerConfig allows it only with enable_auto_tool_choice)
        from server.tool_parsing import check_parser

        check_parser(config.tool_call_parser, tokenizer)  # a parser that cannot work fails the start, not each request
    members = member_names(engine.info)
    name = config.served_model_name or engine.model_name
    vocab_size = int(engine.info.get("vocab_size") or len(tokenizer))
    max_running = config.max_running or engine_max_running(engine)
    engine_cap = engine_max_running(engine, default=0)  # 0: the engine does not say
    if engine_cap and max_running > engine_cap:
        log.warning("--max-running %d exceeds the engine's max_num_seqs %d: the excess waits inside the engine, "
                    "where the server's admission order and timeouts do not reach it", max_running, engine_cap)
    servable = [str(m) for m in engine.info.get("servable_members", [])]
    if name in servable:
        raise ValueError(f"the served model name {name!r} is also a member's name: give the ensemble another "
                         "(--served-model-name), so that requests for the member alone can name it")
    metrics = ServerMetrics(name)
    return Ready(
        engine=engine,
        model_name=name,
        max_model_len=max_model_len,
        vocab_size=vocab_size,
        members=members,
        tokenization=Tokenization(tokenizer, workers=config.tokenizer_workers,
                                  max_pending=config.max_queue + max_running),
        admission=Admission(max_running, config.max_queue),
        metrics=metrics,
        servable_members=servable,
        client_budgets=ClientBudgets(config.client_keys, config.max_queue, config.max_running_per_client),
    )
