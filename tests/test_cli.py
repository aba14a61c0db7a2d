"""The command line: subcommands, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest

from normfx import models
from normfx.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_and_policies(capsys):
    code, out, _ = run_cli(capsys, "models", "--json")
    assert code == 0 and [m["name"] for m in json.loads(out)] == models.names()
    code, out, _ = run_cli(capsys, "policies")
    assert code == 0 and "fuse" in out and "forward=True" in out


def test_explain_json_lists_every_bn(capsys):
    code, out, _ = run_cli(capsys, "explain", "--model", "resnet18", "--policy", "fuse", "--json")
    report = json.loads(out)
    assert code == 0 and report["summary"]["applied"] == 20 and report["summary"]["skipped"] == 0


def test_rewrite_prints_report_and_verification(capsys):
    code, out, _ = run_cli(capsys, "rewrite", "--model", "trap_bn_act", "--policy", "frozen")
    assert code == 0 and "verification against the original: OK" in out
    code, out, _ = run_cli(capsys, "rewrite", "--model", "resnet18", "--policy", "fuse", "--override", "layer1.*=keep", "--json")
    payload = json.loads(out)
    assert code == 0 and payload["verification"]["ok"] and payload["verification"]["max_rel_error"] <= 1e-5
    assert {e["rule"] for e in payload["report"]["entries"] if e["name"].startswith("layer1.")} == {"keep"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["rewrite", "--model", "resnet18", "--policy", "fusee"], "unknown policy 'fusee' (did you mean 'fuse'?); valid policies: adaptive,"),
        (["rewrite", "--model", "resnet18", "--policy", "fuse:bogus=1"], "unknown option(s) bogus; valid options"),
        (["rewrite", "--model", "resnet18", "--policy", "fuse:fowrad=1"], "unknown option(s) fowrad (did you mean 'forward'?)"),
        (["explain", "--model", "nosuchnet", "--policy", "fuse"], "unknown model 'nosuchnet'"),
        (["rewrite", "--model", "resnet18", "--policy", "fuse", "--override", "oops"], "must be GLOB=STEP"),
        (["rewrite", "--model", "resnet18", "--policy", "precise"], "needs calibration data"),
        (["rewrite", "--model", "resnet18", "--policy", "fuse", "--weights", "/nonexistent/w.pt"], "does not exist"),
        (["rewrite", "--model", "resnet18", "--policy", "fuse", "--strict", "--override", "layer1.*=fuse:forward=maybe"],
         "expects bool"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_strict_rewrite_fails_with_exit_2_listing_skips(capsys):
    code, _, err = run_cli(capsys, "rewrite", "--model", "densenet", "--policy", "fuse", "--strict")
    assert code == 2 and "strict=True" in err and "pre-activation" in err


def test_weights_load_with_weights_only(tmp_path, capsys):
    import torch

    model = models.create("resnet18", seed=4)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    code, out, _ = run_cli(capsys, "rewrite", "--model", "resnet18", "--weights", str(tmp_path / "w.pt"), "--policy", "fuse")
    assert code == 0
    (tmp_path / "bad.pt").write_bytes(b"junk")
    code, _, err = run_cli(capsys, "rewrite", "--model", "resnet18", "--weights", str(tmp_path / "bad.pt"), "--policy", "fuse")
    assert code == 2 and "weights_only=True" in err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "normfx", "explain", "--policy", "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "unknown policy" in result.stderr
