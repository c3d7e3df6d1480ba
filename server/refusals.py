"""A budget of refused requests per client: past it, a client's requests get a 429 from their headers
alone, before their body is read or parsed.

A hostile client can send bodies that are cheap to write and costly to refuse (100,000-element
`stop` lists, deep nesting, lone surrogates, bodies at the size limit): each one is read, parsed and
validated before its 400. Valid clients rarely get refused, so a client whose requests keep being
refused is throttled, the way a web server's fail2ban would: every 4xx a client gets (except 429,
which says the server is full, not that the client is wrong) takes one token from its bucket,
which holds `burst` tokens and refills at `burst` per minute; while its bucket is empty, each of
its requests is answered 429 `too_many_refusals` with a `Retry-After`, and the connection closed,
without reading the body. Successful requests cost nothing. A client refused within the last
minute (it has a bucket) also reserves a token for each request in flight, so that requests sent
side by side cannot all pass on one token; overspent tokens go negative (down to `-burst`),
lengthening the throttle. A full bucket with nothing in flight is forgotten.

A client is the name of its key when it sends one of the client keys (`server.clients`), else the
peer address uvicorn reports (behind a proxy every anonymous client shares the proxy's address,
unless serve trusts its `X-Forwarded-For` with `--forwarded-allow-ips`: give such clients keys of
their own). `/health`, `/metrics` and the API docs are never throttled.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette._utils import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import authorization_header, is_protected, matching_client
from server.clients import ClientKey
from server.errors import send_error

MAX_TRACKED = 10_000  # buckets kept in memory; the least recently refused go first


@dataclass
class _Bucket:
    tokens: float
    at: float
    pending: int = 0  # requests in flight that reserved a token


class RefusalBudget:
    """Token buckets of refusals, one per client: `burst` tokens, refilled at `burst` per minute."""

    def __init__(self, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = MAX_TRACKED) -> None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be a positive integer, got {burst!r}")
        self.burst = burst
        self.per_second = burst / 60.0
        self.clock = clock
        self.max_tracked = max_tracked
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _tokens(self, client: str, now: float) -> float:
        bucket = self._buckets.get(client)
        if bucket is None:
            return float(self.burst)
        return min(float(self.burst), bucket.tokens + (now - bucket.at) * self.per_second)

    def retry_after(self, client: str) -> float | None:
        """Seconds until `client` may send a request that could be refused (None: not throttled)."""
        now = self.clock()
        bucket = self._buckets.get(client)
        tokens = self._tokens(client, now)
        if bucket is not None and bucket.pending == 0 and tokens >= self.burst:
            del self._buckets[client]  # refilled and idle: forgotten
            return None
        free = tokens - (bucket.pending if bucket is not None else 0)
        if free >= 1.0:
            return None
        return (1.0 - free) / self.per_second

    def reserve(self, client: str) -> bool:
        """Hold a token for a request of `client` in flight, if it has a bucket (True: held)."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return False
        bucket.pending += 1
        return True

    def settle(self, client: str, reserved: bool, refused: bool) -> None:
        """A request of `client` ended: give back its reservation, and charge it if it was refused."""
        bucket = self._buckets.get(client)
        if reserved and bucket is not None:
            bucket.pending = max(0, bucket.pending - 1)
        if refused:
            self.charge(client)

    def charge(self, client: str) -> None:
        """Record one refusal of `client`."""
        now = self.clock()
        old = self._buckets.get(client)
        tokens = max(-float(self.burst), self._tokens(client, now) - 1.0)
        self._buckets[client] = _Bucket(tokens, now, old.pending if old is not None else 0)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.max_tracked:
            self._buckets.popitem(last=False)

    def tracked(self) -> int:
        """Clients with a bucket in memory."""
        return len(self._buckets)


def charged(status: int) -> bool:
    """Whether a response `status` counts against the client: every 4xx but 429 (server full)."""
    return 400 <= status < 500 and status != 429


class RefusalLimitMiddleware:
    """Throttle clients whose requests keep being refused (see the module docstring)."""

    def __init__(self, app: ASGIApp, burst: int, clients: tuple[ClientKey, ...] = (),
                 on_throttle: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.budget = RefusalBudget(burst, clock=clock)
        self.keys: dict[str, str | None] = {c.key: c.name for c in clients}
        self.on_throttle = on_throttle

    def client_of(self, scope: Scope) -> str:
        """The client a request comes from: 'key:NAME' for a client key, else 'addr:HOST'."""
        if self.keys:
            found, name = matching_client(authorization_header(scope), self.keys)  # as server.auth reads it
            if found:
                return f"key:{name}"
        peer = scope.get("client")
        return f"addr:{peer[0] if peer else 'unknown'}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_protected(get_route_path(scope)):
            await self.app(scope, receive, send)
            return
        client = self.client_of(scope)
        wait = self.budget.retry_after(client)
        if wait is not None:
            if self.on_throttle is not None:
                self.on_throttle()
            await _send_429(send, wait, self.budget.burst)
            return
        reserved = self.budget.reserve(client)
        refused = False

        async def send_and_count(message: Message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start" and charged(message["status"]):
                refused = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self.budget.settle(client, reserved, refused)


async def _send_429(send: Send, wait: float, burst: int) -> None:
    seconds = max(1, math.ceil(wait))
    await send_error(send, 429, f"too many refused requests from this client (more than {burst} a minute); "
                                f"retry after {seconds} s (--max-refusals)", code="too_many_refusals",
                     headers=[(b"retry-after", str(seconds).encode()), (b"connection", b"close")])
