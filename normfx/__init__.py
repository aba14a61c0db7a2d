"""normfx: compile the normalization layers of neural networks (torch.fx and ONNX).

The public API, re-exported from the modules that implement it.
"""

__version__ = "0.1.0"

from . import accumulate, conventions, ema, errors, layers, models, testing  # noqa: E402
from .accumulate import accumulate_gradients  # noqa: E402
from .engine import explain, rewrite, rewrite_with_report  # noqa: E402
from .errors import NormfxError  # noqa: E402
from .export import ExportResult, export  # noqa: E402
from .lint import LintReport, lint  # noqa: E402
from .policy import Option, PolicySpec, parse_policy, policy_names, register_policy  # noqa: E402
from .report import Entry, Report  # noqa: E402
from .stats import diagnose_ema, recompute_stats, recompute_stats_with_report  # noqa: E402
from .verify import VerifyResult, verify  # noqa: E402

__all__ = [
    "__version__",
    "errors",
    "layers",
    "models",
    "testing",
    "ema",
    "accumulate",
    "accumulate_gradients",
    "export",
    "ExportResult",
    "rewrite",
    "rewrite_with_report",
    "explain",
    "verify",
    "lint",
    "LintReport",
    "conventions",
    "VerifyResult",
    "recompute_stats",
    "recompute_stats_with_report",
    "diagnose_ema",
    "Report",
    "Entry",
    "NormfxError",
    "Option",
    "PolicySpec",
    "parse_policy",
    "policy_names",
    "register_policy",
]
