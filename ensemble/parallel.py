"""Which tensor-parallel sizes an ensemble's members can be split into, checked before vLLM starts.

vLLM splits every member over N ranks with its parallel layers, which divide exactly or fail:

* attention: each rank takes ``heads / N`` query heads (``divide`` asserts N | heads);
* KV heads (``QKVParallelLinear``): N | KV heads, or KV heads | N (each KV head then replicated
  ``N / KV`` times);
* MLP (``MergedColumnParallelLinear`` / ``RowParallelLinear``): N | intermediate size.

vLLM checks only the first rule at start-up, on the ensemble's ``config.json`` (whose head count
is the gcd of the members'); the others fail with a bare assertion inside a worker process while
the weights load. `check_tensor_parallel` applies all three to every member first, so a wrong N
gets one clear line naming the member and the sizes it allows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MemberShape:
    """The sizes of one member that tensor parallelism must divide."""

    name: str
    heads: int
    kv_heads: int
    intermediate: tuple[int, ...]  # one per layer when the config lists them, else one value

    def __post_init__(self) -> None:
        sizes = (self.heads, self.kv_heads, *self.intermediate)
        if not self.intermediate or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"member {self.name!r}: head counts and intermediate sizes must be positive integers")

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> MemberShape:
        """From a member's ``config.json`` contents (the text config of a multimodal one)."""
        text = config.get("text_config") or config
        try:
            heads = int(text["num_attention_heads"])
            kv = int(text.get("num_key_value_heads") or heads)
            inter = text["intermediate_size"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"member {name!r}: config.json lacks num_attention_heads / intermediate_size"
            ) from None
        inter = tuple(int(i) for i in inter) if isinstance(inter, (list, tuple)) else (int(inter),)
        return cls(name, heads, kv, inter)

    @classmethod
    def from_folder(cls, name: str, folder: str | Path) -> MemberShape:
        """From the ``config.json`` in a member's folder."""
        path = Path(folder) / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"member {name!r}: cannot read {path}: {err}") from None
        return cls.from_config(name, config)

    def fits(self, size: int) -> bool:
        """Whether vLLM's parallel layers split this member exactly over `size` ranks."""
        return (
            self.heads % size == 0
            and (self.kv_heads % size == 0 or size % self.kv_heads == 0)
            and all(i % size == 0 for i in self.intermediate)
        )

    def tp_sizes(self, limit: int = 64) -> list[int]:
        """The tensor-parallel sizes up to `limit` that fit this member."""
        return [n for n in range(1, limit + 1) if self.fits(n)]


def check_tensor_parallel(size: int, members: Iterable[MemberShape]) -> None:
    """Raise ValueError (one line) unless `size` fits every member."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    for m in members:
        if not m.fits(size):
            inter = m.intermediate[0] if len(set(m.intermediate)) == 1 else list(m.intermediate)
            raise ValueError(
                f"tensor_parallel_size {size} does not fit member {m.name!r} ({m.heads} attention heads, "
                f"{m.kv_heads} KV heads, intermediate size {inter}); it allows "
                f"{', '.join(map(str, m.tp_sizes()))}"
            )
