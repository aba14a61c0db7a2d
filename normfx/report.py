"""What a rewrite applied, skipped and kept, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Entry", "Report", "APPLIED", "SKIPPED", "KEPT"]

APPLIED = "applied"
SKIPPED = "skipped"
KEPT = "kept"


@dataclass
class Entry:
    """One decision about one normalization layer (``name``: module path or fx node name)."""

    name: str
    rule: str
    status: str
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"{self.name}: {self.rule} {self.status}"
        return f"{text} ({self.reason})" if self.reason else text


@dataclass
class Report:
    """Every normalization layer the policy targeted, with the rule tried and the outcome."""

    policy: str = ""
    model: str = ""
    entries: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # model-level remarks (warnings, measurements)
    metrics: dict[str, float] = field(default_factory=dict)  # model-level numbers (e.g. a measured deviation)

    def note(self, text: str) -> None:
        """Add a model-level remark (shown after the table, kept in ``to_dict``)."""
        if text not in self.notes:
            self.notes.append(text)

    def add(self, name: str, rule: str, status: str, reason: str = "", **details: Any) -> Entry:
        if status not in (APPLIED, SKIPPED, KEPT):
            raise ValueError(f"unknown status {status!r}")
        entry = Entry(name, rule, status, reason, details)
        self.entries.append(entry)
        return entry

    def applied_to(self, name: str) -> bool:
        return any(e.name == name and e.status == APPLIED for e in self.entries)

    def names(self) -> set[str]:
        return {e.name for e in self.entries}

    @property
    def applied(self) -> list[Entry]:
        return [e for e in self.entries if e.status == APPLIED]

    @property
    def skipped(self) -> list[Entry]:
        return [e for e in self.entries if e.status == SKIPPED]

    @property
    def kept(self) -> list[Entry]:
        return [e for e in self.entries if e.status == KEPT]

    def extend(self, other: "Report") -> None:
        self.entries.extend(other.entries)
        for text in other.notes:
            self.note(text)
        self.metrics.update(other.metrics)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "model": self.model,
            "summary": {"applied": len(self.applied), "skipped": len(self.skipped), "kept": len(self.kept)},
            "entries": [asdict(e) for e in self.entries],
            "notes": list(self.notes),
            "metrics": dict(self.metrics),
        }

    def format(self) -> str:
        """A plain-text table, one row per entry."""
        rows = [("layer", "rule", "status", "reason")] + [(e.name, e.rule, e.status, e.reason) for e in self.entries]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]
        lines.insert(1, "-" * min(120, max(len(line) for line in lines)))
        summary = f"{len(self.applied)} applied, {len(self.skipped)} skipped, {len(self.kept)} kept"
        return "\n".join(lines + [summary] + [f"note: {text}" for text in self.notes])

    def __str__(self) -> str:
        return self.format()
