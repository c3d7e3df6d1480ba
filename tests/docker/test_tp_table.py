"""docker/README.md's tensor-parallel table, recomputed from the zoo members' config.json.

The TP sizes come from `ensemble.parallel.MemberShape`, the rule the vLLM engine checks before it
starts (N divides the attention heads; N divides the KV heads or they divide N; N divides the MLP
intermediate size), so the table, the engine's refusal message and vLLM's layers agree.
The table rows need the real zoo models (slow); skipped when they are not built.
"""

from __future__ import annotations

import re

import pytest
from dockertools import DOCKER

from ensemble.parallel import MemberShape

ROWS = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3 270M", "qwen2.5": "Qwen2.5-Coder-0.5B"}


def readme_row(label: str) -> list[str]:
    """The cells of the README table row whose first cell starts with `label`."""
    rows = [line for line in (DOCKER / "README.md").read_text().splitlines() if line.startswith(f"| {label} ")]
    assert len(rows) == 1, f"docker/README.md has {len(rows)} table rows for {label!r}"
    return [c.strip() for c in rows[0].strip().strip("|").split("|")]


def test_every_zoo_member_has_one_row() -> None:
    for label in ROWS.values():
        assert len(readme_row(label)) == 5


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ROWS))
def test_readme_row_matches_the_member_config(name: str) -> None:
    from transfer import zoo

    folder = zoo.model_dir(name, build=False)
    if not zoo.is_built(folder):
        pytest.skip(f"zoo model {name} is not built")
    member = MemberShape.from_folder(name, folder)
    cells = readme_row(ROWS[name])
    assert [int(c) for c in cells[1:4]] == [member.heads, member.kv_heads, *member.intermediate], cells
    assert [int(n) for n in re.findall(r"\d+", cells[4])] == member.tp_sizes(), cells
