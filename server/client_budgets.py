"""Each client's own admission budget, taken before the server's.

A client is named by its key when it sends one of the client keys (`server.clients`); a request with
the server's own key, or with no key on an open server, comes from its peer address. A client key
with `max_running` has a budget of that size. `--max-running-per-client N` gives every other client
(keys without their own `max_running`, and each address) a budget of N, created when it first asks
(idle ones are dropped once more than `PRUNE_ABOVE` exist), so that anonymous callers cannot take
the whole engine either. The requests waiting in all those budgets' queues together are at most
`max_queue` (`check_waiting`): many addresses cannot queue more than the server would.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.clients import ClientKey
from server.limits import Admission, QueueFullError

PRUNE_ABOVE = 1024  # budgets kept before idle ones (nothing running, nothing waiting) are dropped


@dataclass(frozen=True)
class ClientId:
    """Who sent a request: `kind` "key" (`value`: the client key's name) or "address" (the peer's)."""

    kind: str
    value: str

    def __str__(self) -> str:
        return f"client {self.value!r}" if self.kind == "key" else f"address {self.value}"


class ClientBudgets:
    """The admission of each client that has one (see the module docstring)."""

    def __init__(self, clients: tuple[ClientKey, ...], max_queue: int,
                 per_client: int | None = None) -> None:
        self.max_queue = max_queue
        self.per_client = per_client
        self._fixed = {ClientId("key", c.name): Admission(c.max_running, max_queue, owner=str(ClientId("key", c.name)))
                       for c in clients if c.max_running is not None}
        self._made: dict[ClientId, Admission] = {}

    def get(self, client: ClientId | None) -> Admission | None:
        """`client`'s admission, made now if the per-client default applies; None: it has none."""
        if client is None:
            return None
        fixed = self._fixed.get(client)
        if fixed is not None or self.per_client is None:
            return fixed
        budget = self._made.get(client)
        if budget is None:
            if len(self._made) >= PRUNE_ABOVE:
                self._prune()
            budget = self._made[client] = Admission(self.per_client, self.max_queue, owner=str(client))
        return budget

    def check_waiting(self, client: ClientId | None, sequences: int = 1) -> None:
        """Raise QueueFullError when a request of `client` must wait in a budget made per client
        and the made budgets' queued requests together are already `max_queue`."""
        budget = self._made.get(client) if client is not None else None
        if budget is None:
            return
        if budget.running + budget.weight_of(sequences) <= budget.max_running and budget.waiting == 0:
            return  # it runs at once
        queued = sum(b.waiting for b in self._made.values())
        if queued >= self.max_queue:
            raise QueueFullError(f"{budget.owner} is at capacity: {budget.running} of {budget.max_running} "
                                 f"sequences running, and {queued} requests of all clients wait "
                                 f"(--max-queue {self.max_queue}); retry later")

    def _prune(self) -> None:
        for client, budget in list(self._made.items()):
            if budget.running == 0 and budget.waiting == 0:
                del self._made[client]

    def __len__(self) -> int:
        return len(self._fixed) + len(self._made)
