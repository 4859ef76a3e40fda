"""Per-verb timings of a machine (``machine.profile``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Profile:
    """Count, total and maximum seconds per verb."""

    rows: dict[str, list[float]] = field(default_factory=dict)

    def record(self, verb: str, seconds: float) -> None:
        """Add one call of ``verb`` that took ``seconds``."""
        row = self.rows.setdefault(verb, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += seconds
        row[2] = max(row[2], seconds)

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{verb: {"count", "total_s", "max_s"}}`` rounded to milliseconds."""
        return {verb: {"count": int(n), "total_s": round(total, 3), "max_s": round(top, 3)}
                for verb, (n, total, top) in sorted(self.rows.items())}
