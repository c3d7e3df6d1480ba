"""Running the app under uvicorn: the CLI and the tests both use `ChorusServer`."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from server.config import ServerConfig
from server.state import ServerState


class ChorusServer(uvicorn.Server):
    """uvicorn's server, plus: start draining the app (503 for new requests, in-flight ones
    labelled "shutdown") the moment shutdown begins, and a hook once the socket is listening."""

    def __init__(self, app: FastAPI, config: ServerConfig, log_level: str = "info",
                 on_listening: Callable[[ChorusServer], None] | None = None) -> None:
        super().__init__(uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            lifespan="on",
            # A backstop: ChorusServer aborts in-flight requests after shutdown_timeout itself.
            timeout_graceful_shutdown=int(config.shutdown_timeout) + 3,
            timeout_keep_alive=5,
            # A client's address (the refusal budget's and --max-running-per-client's key) comes from
            # X-Forwarded-For only when it is sent by a proxy named in --forwarded-allow-ips; uvicorn's
            # own default trusts any local client, which could then pose as any address.
            proxy_headers=config.forwarded_allow_ips is not None,
            forwarded_allow_ips=config.forwarded_allow_ips or "",
        ))
        self.chorus_state: ServerState = app.state.chorus
        self.grace = config.shutdown_timeout
        self.on_listening = on_listening
        self.exit_code = 0

    @property
    def bound_port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        for server in self.servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        return self.config.port

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_listening is not None:
            self.on_listening(self)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.chorus_state.begin_drain()
        aborter = asyncio.create_task(self._abort_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            aborter.cancel()

    async def _abort_after_grace(self) -> None:
        await asyncio.sleep(self.grace)
        aborted = await self.chorus_state.abort_all("shutdown")
        if aborted:
            logging.getLogger("chorus.server").info(
                "shutdown: aborted %d request(s) still running after %.0f s", aborted, self.grace)

    def fail(self, message: str) -> None:
        """Stop serving with exit code 1 (the engine could not load, or died)."""
        self.exit_code = 1
        self.should_exit = True
