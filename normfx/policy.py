"""Policies: names, parsing, per-layer overrides, and the registry later work adds to.

A *step* is ``"name"`` or ``"name:key=value,key=value"``. A *policy* is a step, a list of steps
(applied in order), or a mapping from module-name globs to steps/lists of steps (first match wins):
``{"backbone.*": "frozen", "*": "keep"}``.
"""

from __future__ import annotations

import difflib
import fnmatch
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import PolicyError

__all__ = [
    "Option",
    "PolicySpec",
    "Step",
    "Policy",
    "register_policy",
    "get_policy",
    "policy_names",
    "parse_policy",
]


def _to_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(text)


_CONVERTERS: dict[type, Callable[[Any], Any]] = {bool: _to_bool, int: int, float: float, str: str}
# What a value written in a step string must look like, per option type (said once in the error).
_TEXT_FORMS = {bool: "bool (true/false)", int: "int (e.g. 4)", float: "float (e.g. 1e-5)", str: "str"}
# The Python types a keyword option (``rewrite(m, "fuse", forward=False)``) may have, per option type.
_KEYWORD_TYPES: dict[type, tuple[type, ...]] = {
    bool: (bool,),
    int: (numbers.Integral,),
    float: (numbers.Real,),
    str: (str,),
}


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """``" (did you mean 'fuse'?)"`` when a valid name is close to ``name`` (difflib), else ``""``."""
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class Option:
    """One option a policy accepts: ``name=value`` in a step string."""

    name: str
    type: type
    default: Any
    help: str = ""

    def convert(self, value: Any, policy: str) -> Any:
        """A value written in a step string (text) or given by keyword (a Python value of the option's type)."""
        if isinstance(value, str) and self.type is not str:
            try:
                return _CONVERTERS[self.type](value)
            except (ValueError, TypeError):
                raise PolicyError(
                    f"policy {policy!r}: option {self.name!r} expects {_TEXT_FORMS[self.type]}, got {value!r}"
                ) from None
        return self.check_keyword(value, policy)

    def check_keyword(self, value: Any, policy: str) -> Any:
        """A keyword option must already have the option's type (no text parsing: ``forward="yes"`` is refused)."""
        allowed = _KEYWORD_TYPES[self.type]
        if isinstance(value, bool) and self.type is not bool:
            allowed = ()
        if not isinstance(value, allowed):
            example = {bool: "bool (True/False)", int: "int", float: "float", str: "str"}[self.type]
            raise PolicyError(
                f"policy {policy!r}: option {self.name!r} expects {example}, got {type(value).__name__} {value!r}"
            )
        return self.type(value)


@dataclass
class PolicySpec:
    """What a policy is: its name, its options, and the passes that carry it out per model kind.

    ``torch_pass(model, ctx) -> model`` and ``onnx_pass(model_proto, ctx) -> model_proto`` receive
    a private copy of the caller's model and may edit it; ``ctx`` is a :class:`normfx.engine.PassContext`.
    """

    name: str
    help: str
    options: Mapping[str, Option] = field(default_factory=dict)
    torch_pass: Callable[..., Any] | None = None
    onnx_pass: Callable[..., Any] | None = None
    needs_data: bool = False
    exact: bool = True  # the rewrite keeps the model's function (verified to rtol 1e-5)
    # The torch pass accepts the caller's model (ctx.owns_model False), never mutates it and returns a
    # model sharing nothing with it: the engine then skips its up-front deepcopy.
    copies_input: bool = False
    # ``normfx.export`` of a torch model runs the ONNX pass again on the exported graph, for what the torch
    # route left (fuse: BNs the exporter exposes). False when the torch pass already did the whole job.
    rerun_on_export: bool = True
    uses_data: bool = False  # takes `data` when given (needs_data: must be given)
    # The step fixes its new parameters so the model keeps its function on `data` (unfuse): a later step that
    # recomputes statistics (`recomputes_statistics`) on the same data then changes next to nothing.
    calibrates_on_data: bool = False
    recomputes_statistics: bool = False

    @property
    def takes_data(self) -> bool:
        return self.needs_data or self.uses_data


_REGISTRY: dict[str, PolicySpec] = {}


def register_policy(spec: PolicySpec, *, replace: bool = False) -> PolicySpec:
    """Add a policy to the registry (used by normfx's own modules and by plug-ins)."""
    if spec.name in _REGISTRY and not replace:
        raise PolicyError(f"policy {spec.name!r} is already registered; pass replace=True to override it")
    if not spec.name or any(ch in spec.name for ch in ":,=*?"):
        raise PolicyError(f"invalid policy name {spec.name!r}: use letters, digits, '-' and '_'")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_builtin_policies() -> None:
    # Importing the modules registers their policies; done lazily to keep import order simple.
    from . import builtin_policies  # noqa: F401


def policy_names() -> list[str]:
    _ensure_builtin_policies()
    return sorted(_REGISTRY)


def get_policy(name: str) -> PolicySpec:
    _ensure_builtin_policies()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PolicyError(
            f"unknown policy {name!r}{did_you_mean(name, _REGISTRY)}; valid policies: {', '.join(sorted(_REGISTRY))}"
        ) from None


@dataclass(frozen=True)
class Step:
    """A policy name with its (validated, typed) options."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def spec(self) -> PolicySpec:
        return get_policy(self.name)

    def option(self, key: str) -> Any:
        return dict(self.options)[key]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.options)

    def __str__(self) -> str:
        defaults = {k: o.default for k, o in self.spec.options.items()}
        changed = [(k, v) for k, v in self.options if defaults.get(k) != v]
        if not changed:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in changed)

    @classmethod
    def parse(cls, text: "str | Step", extra: Mapping[str, Any] | None = None) -> "Step":
        """Parse ``"name:key=value,..."``; ``extra`` supplies options by keyword (e.g. from ``rewrite``)."""
        if isinstance(text, Step):
            return text
        if not isinstance(text, str):
            raise PolicyError(f"a policy step must be a string like 'fuse' or 'fuse:key=value', got {text!r}")
        name, _, rest = text.strip().partition(":")
        spec = get_policy(name.strip())
        given: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise PolicyError(f"policy {spec.name!r}: option {item!r} must be written key=value")
            if key.strip() in given:
                raise PolicyError(f"policy {spec.name!r}: option {key.strip()!r} is given twice in {text!r}")
            given[key.strip()] = value.strip()
        unknown = sorted(set(given) - set(spec.options))
        if unknown:
            valid = ", ".join(sorted(spec.options)) or "none"
            hint = did_you_mean(unknown[0], spec.options) if len(unknown) == 1 else ""
            raise PolicyError(f"policy {spec.name!r}: unknown option(s) {', '.join(unknown)}{hint}; valid options: {valid}")
        values = {k: opt.convert(given[k], spec.name) if k in given else opt.default for k, opt in spec.options.items()}
        for key, value in (extra or {}).items():  # keyword options: typed Python values, no text parsing
            if key in spec.options and key not in given:
                values[key] = spec.options[key].check_keyword(value, spec.name)
        return cls(spec.name, tuple(sorted(values.items())))


@dataclass(frozen=True)
class Policy:
    """An ordered list of (glob, steps) rules; a layer gets the steps of the first glob it matches."""

    rules: tuple[tuple[str, tuple[Step, ...]], ...]

    def steps_for(self, layer_name: str) -> tuple[Step, ...]:
        for pattern, steps in self.rules:
            if fnmatch.fnmatchcase(layer_name, pattern):
                return steps
        return ()

    def ordered_steps(self) -> list[Step]:
        """Every distinct step, in order of first appearance; each runs once over its layers."""
        seen: list[Step] = []
        for _, steps in self.rules:
            for step in steps:
                if step not in seen:
                    seen.append(step)
        return seen

    def targets(self, step: Step, layer_name: str) -> bool:
        return step in self.steps_for(layer_name)

    def __str__(self) -> str:
        if len(self.rules) == 1 and self.rules[0][0] == "*":
            return " + ".join(str(s) for s in self.rules[0][1])
        return "; ".join(f"{g} -> {' + '.join(str(s) for s in steps)}" for g, steps in self.rules)


def _steps(value: Any, extra: Mapping[str, Any] | None) -> tuple[Step, ...]:
    if isinstance(value, (str, Step)):
        return (Step.parse(value, extra),)
    if isinstance(value, Sequence) and value and all(isinstance(v, (str, Step)) for v in value):
        return tuple(Step.parse(v, extra) for v in value)
    raise PolicyError(f"expected a policy step or a non-empty list of steps, got {value!r}")


def parse_policy(policy: Any, extra: Mapping[str, Any] | None = None) -> Policy:
    """Normalize any accepted policy form into a :class:`Policy`.

    ``extra`` holds keyword options (``rewrite(..., key=value)``); they fill in options the steps
    did not set and are ignored by steps that do not have them. Options no step knows raise.
    """
    if isinstance(policy, Policy):
        parsed = policy
    elif isinstance(policy, Mapping):
        if not policy:
            raise PolicyError("an override mapping needs at least one 'glob: step' entry")
        parsed = Policy(tuple((str(glob), _steps(steps, extra)) for glob, steps in policy.items()))
    else:
        parsed = Policy((("*", _steps(policy, extra)),))
    if extra:
        known = {k for step in parsed.ordered_steps() for k in step.spec.options}
        unknown = sorted(set(extra) - known)
        if unknown:
            valid = ", ".join(sorted(known)) or "none"
            hint = did_you_mean(unknown[0], known) if len(unknown) == 1 else ""
            raise PolicyError(f"unknown option(s) {', '.join(unknown)}{hint} for policy {parsed}; valid options: {valid}")
    return parsed


def describe_policies(names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Name, help and options of each registered policy (for ``normfx policies`` and the docs)."""
    out = []
    for name in names or policy_names():
        spec = get_policy(name)
        out.append(
            {
                "name": spec.name,
                "help": spec.help,
                "exact": spec.exact,
                "needs_data": spec.needs_data,
                "torch": spec.torch_pass is not None,
                "onnx": spec.onnx_pass is not None,
                "options": {k: {"type": o.type.__name__, "default": o.default, "help": o.help} for k, o in spec.options.items()},
            }
        )
    return out
