"""What the linter found: one :class:`Finding` per problem (severity, layer, one-line message, the fix),
collected in a :class:`LintReport`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Finding", "LintReport", "INFO", "WARNING", "ERROR", "SEVERITIES"]

INFO, WARNING, ERROR = "info", "warning", "error"
SEVERITIES = (INFO, WARNING, ERROR)


@dataclass
class Finding:
    """One problem on one layer.

    ``check``: the check's short name (``eps``, ``running_var``, ...); ``layer``: module path (torch) or node name
    (ONNX), ``""`` for the whole model; ``message``: one line saying what is wrong and why it matters; ``fix``: the
    normfx call or command that fixes it, or ``None`` when normfx has none (the message then says what to do).
    """

    severity: str
    check: str
    layer: str
    message: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}; one of {SEVERITIES}")

    def __str__(self) -> str:
        where = self.layer or "<model>"
        text = f"{self.severity}: {where}: [{self.check}] {self.message}"
        return f"{text} (fix: {self.fix})" if self.fix else text


@dataclass
class LintReport:
    """Every finding of :func:`normfx.lint`, in check order; ``checks_run`` names the checks that ran."""

    model: str = ""
    kind: str = ""  # "torch" or "onnx"
    findings: list[Finding] = field(default_factory=list)
    checks_run: list[str] = field(default_factory=list)
    layers: int = 0  # normalization layers (torch) / BatchNormalization nodes (ONNX) looked at

    def add(self, severity: str, check: str, layer: str, message: str, fix: str | None = None,
            **details: Any) -> Finding:
        finding = Finding(severity, check, layer, message, fix, details)
        self.findings.append(finding)
        return finding

    def ran(self, check: str) -> None:
        if check not in self.checks_run:
            self.checks_run.append(check)

    def at(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        return self.at(ERROR)

    @property
    def warnings(self) -> list[Finding]:
        return self.at(WARNING)

    @property
    def infos(self) -> list[Finding]:
        return self.at(INFO)

    @property
    def ok(self) -> bool:
        """No finding at error severity (the CLI's exit code 0)."""
        return not self.errors

    def on(self, layer: str, check: str | None = None) -> list[Finding]:
        """The findings on ``layer`` (of one ``check`` when given)."""
        return [f for f in self.findings if f.layer == layer and (check is None or f.check == check)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "kind": self.kind,
            "layers": self.layers,
            "summary": {s: len(self.at(s)) for s in SEVERITIES},
            "checks_run": list(self.checks_run),
            "findings": [asdict(f) for f in self.findings],
        }

    def format(self) -> str:
        """One line per finding, errors first, then a summary line."""
        order = {ERROR: 0, WARNING: 1, INFO: 2}
        lines = [str(f) for f in sorted(self.findings, key=lambda f: order[f.severity])]
        summary = ", ".join(f"{len(self.at(s))} {s}{'s' if len(self.at(s)) != 1 else ''}" for s in reversed(SEVERITIES))
        label = f"{self.model}: " if self.model else ""
        lines.append(f"{label}{self.layers} normalization layers checked: {summary}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()
