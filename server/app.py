"""The FastAPI app factory.

The engine loads in the background during the lifespan (so `/health` answers 503 meanwhile and
200 once it is ready). Once loaded, a watchdog asks the engine every `HEALTH_INTERVAL_S` seconds
whether it can still serve (vLLM's engine core process alive, the reference engine's worker thread
running); when it cannot, `/health` and every request answer 503 `engine_dead`, requests in flight
are aborted, and `on_engine_dead` is called (the CLI then exits with status 1, for a supervisor
such as Docker's restart policy to start a fresh server).

Shutdown is graceful: as soon as uvicorn starts shutting down, `server.serving.ChorusServer` calls
`ServerState.begin_drain` (new requests and `/health` answer 503), gives in-flight requests
`shutdown_timeout` seconds to finish, then aborts the rest through the engine (their clients get a
503, or an error event and `[DONE]` in a stream); the lifespan's exit aborts anything left and
calls `engine.shutdown()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from ensemble.protocol import Engine
from server.auth import APIKeyMiddleware
from server.body_limit import BodyLimitMiddleware
from server.config import ServerConfig
from server.engines import engine_healthy, load_engine
from server.errors import install_error_handlers
from server.openapi import install_openapi
from server.refusals import RefusalLimitMiddleware
from server.routes_chat import router as chat_router
from server.routes_completions import router as completions_router
from server.routes_misc import router as misc_router
from server.state import ServerState, build_ready

log = logging.getLogger("chorus.server")

EngineLoader = Callable[[], Awaitable[Engine]]
HEALTH_INTERVAL_S = 2.0


async def _watch(state: ServerState, engine: Engine, on_dead: Callable[[str], None] | None) -> None:
    """Poll the engine's health until it dies, then fail everything fast."""
    while True:
        await asyncio.sleep(HEALTH_INTERVAL_S)
        problem = await engine_healthy(engine)
        if problem is None or state.draining:
            continue
        state.engine_dead = problem
        log.error("the engine has died: %s; answering 503 and stopping", problem)
        aborted = await state.abort_all("engine_dead")
        if aborted:
            log.error("aborted %d request(s) that were running on the dead engine", aborted)
        if on_dead is not None:
            on_dead(problem)
        return


async def _load(state: ServerState, loader: EngineLoader, on_error: Callable[[str], None] | None,
                on_dead: Callable[[str], None] | None = None) -> None:
    engine: Engine | None = None
    try:
        engine = await loader()
        ready = await asyncio.to_thread(build_ready, state.config, engine)
        ready.metrics.set_load_source(lambda: (ready.engine.stats(), ready.admission.waiting))
        state.ready = ready
        # Warm the token-bytes table (chat logprobs) off the loop; it is built on demand otherwise.
        state.background.append(asyncio.create_task(asyncio.to_thread(ready.token_bytes_table)))
        state.background.append(asyncio.create_task(_watch(state, engine, on_dead), name="chorus-watchdog"))
        log.info("engine ready: %s (%s), max_model_len %d, %d member(s)",
                 ready.model_name, ready.engine.info.get("engine", "?"), ready.max_model_len, len(ready.members))
    except asyncio.CancelledError:
        if engine is not None:
            await engine.shutdown()
        raise
    except Exception as err:  # noqa: BLE001 - reported by /health and the callback
        state.load_error = f"{type(err).__name__}: {err}"
        log.error("the engine failed to load: %s", state.load_error)
        if engine is not None:
            await engine.shutdown()
        if on_error is not None:
            on_error(state.load_error)


async def _shutdown(state: ServerState, loading: asyncio.Task) -> None:
    state.begin_drain()
    for task in state.background:
        task.cancel()
    if not loading.done():
        log.info("waiting for the engine to finish loading before shutting it down")
        try:
            await loading
        except BaseException:  # noqa: BLE001
            pass
    aborted = await state.abort_all("shutdown")
    if aborted:
        log.info("aborted %d request(s) still in flight", aborted)
    ready = state.ready
    if ready is not None:
        try:
            await ready.engine.shutdown()
        finally:
            ready.tokenization.close()
    log.info("engine shut down")


def create_app(
    config: ServerConfig,
    engine_loader: EngineLoader | None = None,
    on_load_error: Callable[[str], None] | None = None,
    on_engine_dead: Callable[[str], None] | None = None,
) -> FastAPI:
    """An app serving the ensemble of `config`.

    Args:
        config: the server settings.
        engine_loader: builds the engine (default: `server.engines.load_engine(config)`).
        on_load_error: called with the message if the engine fails to load (the CLI exits).
        on_engine_dead: called with the reason if the loaded engine dies (the CLI exits).
    """
    state = ServerState(config)
    loader = engine_loader or (lambda: load_engine(config))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load(state, loader, on_load_error, on_engine_dead),
                                      name="chorus-engine-load")
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await _shutdown(state, loading)

    app = FastAPI(
        title="chorus",
        summary="Several LLMs speaking as one, behind the OpenAI API.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.chorus = state
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(completions_router)
    app.include_router(chat_router)
    app.include_router(misc_router)
    # Starlette runs the middleware added last first: the key is checked before a body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.authenticated:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key, clients=config.client_keys)
    if config.max_refusals:  # outermost: sees every 4xx (401 and 413 too) and throttles before the key check
        app.add_middleware(RefusalLimitMiddleware, burst=config.max_refusals, clients=config.client_keys,
                           on_throttle=lambda: _count_throttled(state))
    return app


def _count_throttled(state: ServerState) -> None:
    if state.ready is not None:
        state.ready.metrics.refusal_rejections.inc()
