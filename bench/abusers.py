"""The abusers of `bench/abuse.py`: slow readers, a disconnect storm, huge bodies and hostile JSON,
each a loop of requests on loopback from a chosen source address, run in a process of their own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

KINDS = ("slow_readers", "disconnect_storm", "huge_bodies", "hostile_json")

def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the server on loopback from the address `source` (any of 127.0.0.0/8)."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


def _http(key: str, source: str, timeout: float) -> httpx.AsyncClient:
    """An httpx client with the abusers' key, connecting from `source`."""
    return httpx.AsyncClient(headers={**_auth(key), "Content-Type": "application/json"}, timeout=timeout,
                             transport=httpx.AsyncHTTPTransport(local_address=source))


async def _raw_request(port: int, body: bytes, key: str, source: str,
                       headers: str = "") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _connect(port, source)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: chorus\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {key}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    return reader, writer


async def _status(reader: asyncio.StreamReader) -> int:
    line = await reader.readline()
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


async def slow_reader(port: int, key: str, source: str, statuses: Counter, stop: asyncio.Event) -> None:
    """Streaming requests for long answers that are never read, one after another."""
    body = json.dumps({"prompt": "Tell a long story", "max_tokens": 256, "n": 4, "ignore_eos": True,
                       "stream": True, "logprobs": 5}).encode()
    while not stop.is_set():
        try:
            reader, writer = await _raw_request(port, body, key, source)
        except ConnectionError:  # throttled (server.refusals): answered 429 and closed before the body was read
            statuses["closed"] += 1
            await asyncio.sleep(0.05)
            continue
        statuses["opened"] += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 10.0)  # hold it, unread, for a while
        writer.close()


async def disconnect_storm(port: int, key: str, source: str, statuses: Counter, stop: asyncio.Event) -> None:
    """Streaming requests dropped right after their first bytes."""
    body = json.dumps({"prompt": "Hello", "max_tokens": 64, "stream": True}).encode()
    while not stop.is_set():
        try:
            reader, writer = await _raw_request(port, body, key, source)
            statuses[str(await _status(reader))] += 1
            writer.close()
        except ConnectionError:  # throttled and closed before the body was read
            statuses["closed"] += 1
        await asyncio.sleep(0.05)


async def huge_bodies(port: int, url: str, key: str, source: str, huge_mb: float, statuses: Counter, stop: asyncio.Event) -> None:
    """Bodies over the limit: announced by their Content-Length (the answer must come before the
    body is sent), and chunked (cut off at the limit)."""
    size = int(huge_mb * (1 << 20))
    blob = b"a" * (1 << 20)

    async def chunks():
        yield b'{"prompt": "'
        for _ in range(size >> 20):
            yield blob
        yield b'"}'

    async with _http(key, source, 60) as http:
        while not stop.is_set():
            reader, writer = await _connect(port, source)
            try:
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: chorus\r\nContent-Type: application/json\r\n"
                             + f"Authorization: Bearer {key}\r\nContent-Length: {size}\r\n\r\n".encode()
                             + blob)
                await writer.drain()
                statuses[f"{await _status(reader)}"] += 1  # answered after 1 MiB of the announced size
            except ConnectionError:
                statuses["closed"] += 1  # the server answered 413 and hung up while the client still wrote
            finally:
                writer.close()
            try:
                r = await http.post(f"{url}/v1/completions", content=chunks())
                statuses[f"chunked {r.status_code}"] += 1
            except httpx.HTTPError:
                statuses["chunked closed"] += 1  # the server may hang up while the body is still going
            await asyncio.sleep(0.2)


async def hostile_json(url: str, key: str, source: str, statuses: Counter, stop: asyncio.Event) -> None:
    """Bodies that crashed the server before the hardening."""
    bodies = [
        b'{"prompt": "a\\ud800", "max_tokens": 1}',
        json.dumps({"prompt": "a", "max_tokens": 1, "stop": ["x"] * 100_000}).encode(),
        b'{"prompt": "a", "max_tokens": 1, "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        json.dumps({"prompt": ["a"] * 64, "n": 32, "max_tokens": 1}).encode(),
    ]
    async with _http(key, source, 60) as http:
        while not stop.is_set():
            for body in bodies:
                try:
                    r = await http.post(f"{url}/v1/completions", content=body)
                    statuses[str(r.status_code)] += 1
                except httpx.TransportError:  # throttled: a 429 and a closed connection before the body was read
                    statuses["closed"] += 1
            await asyncio.sleep(0.05)




def abusers_process(url: str, huge_mb: float, count: int, kinds: tuple[str, ...], nice: int, key: str,
                     source: str, started: Any, stop: Any, results: Any) -> None:
    """The abusers, in a process of their own: their client-side work (building and sending big
    bodies, parsing answers) must not hold up the valid client's event loop and so its clock, as
    it would if both shared one loop; an attacker is not inside the victim's client either. Sends
    back their answers, failures and the CPU seconds the process used."""
    if nice:
        os.nice(nice)
    answers, failures = asyncio.run(_abuse(url, key, source, huge_mb, count, kinds, started, stop))
    results.put((answers, failures, time.process_time()))


async def _abuse(url: str, key: str, source: str, huge_mb: float, count: int, kinds: tuple[str, ...], started: Any,
                 stop_flag: Any) -> tuple[dict[str, dict[str, int]], list[str]]:
    port = int(url.rsplit(":", 1)[1])
    stop = asyncio.Event()
    makers: dict[str, Callable[[Counter], Awaitable[None]]] = {
        "slow_readers": lambda c: slow_reader(port, key, source, c, stop),
        "disconnect_storm": lambda c: disconnect_storm(port, key, source, c, stop),
        "huge_bodies": lambda c: huge_bodies(port, url, key, source, huge_mb, c, stop),
        "hostile_json": lambda c: hostile_json(url, key, source, c, stop),
    }
    abusers: dict[str, Counter] = {}
    tasks = [asyncio.create_task(makers[name](abusers.setdefault(name, Counter())))
             for name in kinds for _ in range(count)]
    started.set()
    await asyncio.get_running_loop().run_in_executor(None, stop_flag.wait)
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    return {name: {str(k): v for k, v in c.items()} for name, c in abusers.items()}, failures
