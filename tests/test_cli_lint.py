"""``normfx lint``: exit 0 on a clean model, 1 when a finding is an error, 2 on bad input; ``--json`` parsed."""

from __future__ import annotations

import json

import onnx
import pytest
from test_lint import onnx_devils

from normfx import cli


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["lint", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_clean_zoo_model_exits_0(capsys):
    code, out, err = run(capsys, "--model", "resnet18", "--json")
    assert code == 0 and not err
    data = json.loads(out)
    assert data["model"] == "resnet18" and data["kind"] == "torch" and data["layers"] == 20
    assert data["summary"]["error"] == 0 and data["summary"]["warning"] == 0
    assert "reached" in data["checks_run"]  # the zoo model's example input ran: reach was checked


def test_text_output_lists_findings_and_summary(capsys):
    code, out, _ = run(capsys, "--model", "trap_shared_bn")
    assert code == 0  # warnings only
    lines = out.strip().splitlines()
    assert lines[0].startswith("warning: bn: [reached_twice] reached 2 times per forward")
    assert lines[-1] == "trap_shared_bn: 2 normalization layers checked: 0 errors, 2 warnings, 0 infos"


def test_devil_model_exits_1(capsys):
    code, out, _ = run(capsys, "--model", "normfx.models.devils:devil_net", "--json")
    assert code == 1
    data = json.loads(out)
    errors = {(f["layer"], f["check"]) for f in data["findings"] if f["severity"] == "error"}
    # the loader puts the model in eval (train_bn/head_bn too), so only the statistics errors remain
    assert errors == {("nan_bn", "statistics"), ("negvar_bn", "running_var")}
    warnings = {(f["layer"], f["check"]) for f in data["findings"] if f["severity"] == "warning"}
    assert {("eps_bn", "eps"), ("unused_bn", "reached"), ("twice_bn", "reached_twice"), ("block", "mixed_frozen"),
            ("overflow_bn", "fold_fp16_overflow")} <= warnings


def test_onnx_devils_exit_1_and_fixes_name_the_file(capsys, tmp_path):
    path = tmp_path / "devils.onnx"
    onnx.save(onnx_devils(), path)
    code, out, _ = run(capsys, "--model", str(path), "--json")
    assert code == 1
    data = json.loads(out)
    assert data["kind"] == "onnx" and data["summary"]["error"] == 3
    eps = next(f for f in data["findings"] if f["check"] == "eps")
    assert eps["fix"] == f"normfx rewrite --model {path} --policy fuse --out fused.onnx"


def test_input_shape_gives_the_reach_checks_their_input(capsys):
    code, out, _ = run(capsys, "--model", "normfx.models.devils:fresh_legacy_net", "--input-shape", "1,3,8,8",
                       "--json")
    assert code == 0
    data = json.loads(out)
    assert [(f["layer"], f["check"], f["severity"]) for f in data["findings"]] == [("bn2", "fresh_gamma", "warning")]


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_model"], "unknown model"),
    (["--model", "resnet18", "--input-shape", "1,5,64,64"], "input"),
    (["--model", "resnet18", "--input-shape", "a,b"], "cannot read input shape"),
])
def test_bad_input_exits_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and not out
    assert err.startswith("normfx lint: error:") and message in err and len(err.strip().splitlines()) == 1


def test_corrupt_onnx_exits_2(capsys, tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    code, out, err = run(capsys, "--model", str(path))
    assert code == 2 and "not a readable ONNX model" in err
    assert path.read_bytes() == b"not a model"


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["lint", "--no-such-flag"])
    assert exc.value.code == 2
