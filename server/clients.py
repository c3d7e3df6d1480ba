"""Client keys with quotas: several API keys, each naming a client, each client with its own
budget of running sequences.

With one shared key, every caller draws on the same admission: a client that keeps many heavy
streams running (or never reads them) slows every step of the engine for everyone, and nothing
can tell it apart from the others. A keys file gives each client its own key and, optionally, a
`max_running` of its own: a request first takes room in its client's `Admission` (waiting in that
client's queue, so it never holds up another client's requests), then in the server's. The
server's own `--api-key`, if set, stays a key without a quota.

The file is JSON, a list of clients::

    [{"name": "alice", "key": "sk-alice-...", "max_running": 8},
     {"name": "batch", "key": "sk-batch-...", "max_running": 2},
     {"name": "bob", "key": "sk-bob-..."}]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ClientKeysError(ValueError):
    """A keys file that cannot be used; the message says where."""


@dataclass(frozen=True)
class ClientKey:
    """One client: its `name` (in logs and metrics), its bearer `key`, and the sequences it may
    have running at once (`max_running`; None: only the server's limit applies)."""

    name: str
    key: str
    max_running: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ClientKeysError(f"a client needs a non-empty name, got {self.name!r}")
        if not isinstance(self.key, str) or not self.key.strip():
            raise ClientKeysError(f"client {self.name!r} has an empty key")
        object.__setattr__(self, "key", self.key.strip())
        quota = self.max_running
        if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 1):
            raise ClientKeysError(f"client {self.name!r}: max_running must be a positive integer, got {quota!r}")


def parse_client_keys(data: Any, where: str = "client keys") -> tuple[ClientKey, ...]:
    """Clients from the JSON value of a keys file (a list of objects); names and keys unique."""
    if not isinstance(data, list) or not data:
        raise ClientKeysError(f"{where}: expected a non-empty JSON list of clients")
    clients = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ClientKeysError(f"{where}[{i}]: expected an object with 'name' and 'key'")
        unknown = set(item) - {"name", "key", "max_running"}
        if unknown:
            raise ClientKeysError(f"{where}[{i}]: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            clients.append(ClientKey(item.get("name"), item.get("key"), item.get("max_running")))
        except ClientKeysError as err:
            raise ClientKeysError(f"{where}[{i}]: {err}") from None
    for attr in ("name", "key"):
        values = [getattr(c, attr) for c in clients]
        if len(set(values)) != len(values):
            raise ClientKeysError(f"{where}: two clients share a {attr}")
    return tuple(clients)


def load_client_keys(path: str | Path) -> tuple[ClientKey, ...]:
    """The clients of the keys file at `path`."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ClientKeysError(f"cannot read the client keys file {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ClientKeysError(f"{path} is not valid JSON: {err}") from None
    return parse_client_keys(data, str(path))
