"""The smoke run's report: seconds per step, printed as each step ends and as a table at the end."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Timings:
    """Seconds per step, printed as a table."""

    steps: list[tuple[str, float, str]] = field(default_factory=list)

    def add(self, name: str, seconds: float, note: str = "") -> None:
        self.steps.append((name, seconds, note))
        print(f"[smoke] {name}: {seconds:.1f}s {note}".rstrip(), flush=True)

    def table(self) -> str:
        width = max((len(n) for n, _, _ in self.steps), default=4)
        lines = [f"{'step'.ljust(width)}  seconds  note"]
        lines += [f"{n.ljust(width)}  {s:7.1f}  {note}" for n, s, note in self.steps]
        lines.append(f"{'total'.ljust(width)}  {sum(s for _, s, _ in self.steps):7.1f}")
        return "\n".join(lines)
