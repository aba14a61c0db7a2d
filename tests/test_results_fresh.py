"""Committed benchmark results are as new as the code they measure, and the README quotes them.

Each ``benchmarks/results/*.json`` names the commit it ran on (``commit``), the repository paths whose change
invalidates it (``measures``) and the measured paths that had uncommitted changes (``dirty``; written by
``benchmarks/_results.py``). A result is fresh when the last commit touching any measured path is an ancestor
of (or is) the result's commit: ``git log -1 --format=%H -- <measures>`` then ``git merge-base --is-ancestor``.
To refresh: commit the code, then ``./run.sh bench --commit`` on a quiet machine, then
``python benchmarks/readme_numbers.py --update``, and commit the results.

Without git history the check cannot be made: the test fails and says so (a stale result must not pass
silently because the checkout was exported without ``.git``). A shallow clone (CI's may be) is deepened by
``.ci/run``; one that cannot be is skipped with that reason.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", "*.json")))
REFRESH = "commit the code, run `./run.sh bench --commit` on a quiet machine, then `python benchmarks/readme_numbers.py --update`"


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def require_history() -> None:
    try:
        inside = git("rev-parse", "--is-inside-work-tree")
    except OSError:
        pytest.fail("git is not installed: the freshness of benchmarks/results/*.json cannot be checked; install git")
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        pytest.fail("no git history here (an export without .git?): the freshness of benchmarks/results/*.json "
                    "cannot be checked; run the tests in a git clone")
    if git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        # .ci/run unshallows first; a shallow clone that could not be deepened cannot tell fresh from stale, and
        # failing there would only say where the tests ran: a skip whose reason pytest prints (-rs)
        pytest.skip("shallow git clone (git fetch --unshallow failed): the commits the results name are missing, "
                    "so their freshness cannot be checked here")


def freshness_problem(path: str) -> str | None:
    """Why the committed result at ``path`` is not fresh (None when it is)."""
    name = os.path.relpath(path, REPO)
    with open(path) as handle:
        data = json.load(handle)
    commit, measures = data.get("commit"), data.get("measures")
    if not commit or not measures:
        return f"{name} has no commit/measures stamp (written before benchmarks recorded them): {REFRESH}"
    if data.get("dirty"):
        return (f"{name} was measured with uncommitted changes in {', '.join(data['dirty'])}, so it belongs to no "
                f"commit: {REFRESH}")
    missing = [p for p in measures if not os.path.exists(os.path.join(REPO, p))]
    if missing:
        return f"{name} measures paths that do not exist: {', '.join(missing)}; fix MEASURES in its bench script"
    if git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        return f"{name} names commit {commit[:12]}, which is not in this repository's history: {REFRESH}"
    if git("merge-base", "--is-ancestor", commit, "HEAD").returncode != 0:
        return f"{name} was measured on commit {commit[:12]}, which is not an ancestor of HEAD: {REFRESH}"
    last = git("log", "-1", "--format=%H", "--", *measures).stdout.strip()
    if not last:
        return f"{name}: none of its measured paths ({', '.join(measures)}) is committed yet: {REFRESH}"
    if git("merge-base", "--is-ancestor", last, commit).returncode != 0:
        subject = git("log", "-1", "--format=%h %s", last).stdout.strip()
        return (f"{name} was measured on {commit[:12]}, older than the last change to what it measures "
                f"({subject[:100]}): {REFRESH}")
    return None


def test_results_exist():
    assert {os.path.basename(p) for p in RESULTS} >= {"fx_fuse.json", "onnx.json", "proxynorm.json", "stats.json"}


@pytest.mark.parametrize("path", RESULTS, ids=[os.path.basename(p) for p in RESULTS])
def test_committed_result_is_not_older_than_the_code_it_measures(path):
    require_history()
    problem = freshness_problem(path)
    assert problem is None, problem


def test_readme_quotes_the_committed_results():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import readme_numbers
    finally:
        sys.path.pop(0)
    with open(os.path.join(REPO, "README.md")) as handle:
        text = handle.read()
    for name, make in readme_numbers.BLOCKS.items():
        block = readme_numbers.readme_block(text, name)
        assert block is not None, f"README.md has lost its {name} markers"
        assert block == make(), (
            f"README.md's {name} differs from benchmarks/results: run `python benchmarks/readme_numbers.py --update`")


# --- the check itself, on a scratch repository: fresh, stale, unstamped, dirty -------------------------------


def _scratch_repo(tmp_path):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*args):
        done = subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True, env=env)
        return done.stdout.strip()

    run("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "other.py").write_text("b = 1\n")
    run("add", ".")
    run("commit", "-q", "-m", "code")
    return run


def test_the_check_tells_fresh_from_stale_unstamped_and_dirty(tmp_path, monkeypatch):
    run = _scratch_repo(tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    measured_on = run("rev-parse", "HEAD")
    result = tmp_path / "r.json"

    def write(**stamp):
        result.write_text(json.dumps({**stamp, "summary": {}, "rows": []}))

    write(commit=measured_on, measures=["code.py"], dirty=[])
    assert freshness_problem(str(result)) is None
    (tmp_path / "other.py").write_text("b = 2\n")  # a change to something it does not measure: still fresh
    run("commit", "-qam", "other")
    assert freshness_problem(str(result)) is None
    write(commit=measured_on, measures=["code.py"], dirty=["code.py"])
    assert "uncommitted changes in code.py" in freshness_problem(str(result))
    write(summary={})
    assert "no commit/measures stamp" in freshness_problem(str(result))
    write(commit="0" * 40, measures=["code.py"], dirty=[])
    assert "not in this repository's history" in freshness_problem(str(result))
    write(commit=measured_on, measures=["gone.py"], dirty=[])
    assert "do not exist: gone.py" in freshness_problem(str(result))
    (tmp_path / "code.py").write_text("a = 2\n")  # the measured code changes after the result
    run("commit", "-qam", "faster code")
    write(commit=measured_on, measures=["code.py"], dirty=[])
    assert "older than the last change to what it measures" in freshness_problem(str(result))
    assert "faster code" in freshness_problem(str(result))


def test_results_stamp_what_they_measure(tmp_path, monkeypatch):
    """benchmarks/_results.py writes commit, measures and dirty next to the numbers."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import _results
    finally:
        sys.path.pop(0)
    out = tmp_path / "deep" / "fx_fuse.json"
    _results.report({"x_median": 1.0}, [{"model": "m", "x": 1.0}], str(out), measures=["normfx/fold.py"])
    data = json.loads(out.read_text())
    head = git("rev-parse", "HEAD").stdout.strip() or None
    assert data["commit"] == head and data["measures"] == ["normfx/fold.py"]
    assert isinstance(data["dirty"], list) and data["rows"] == [{"model": "m", "x": 1.0}]
    assert _results.result_path("out/benchmarks", "onnx.json") == os.path.join("out/benchmarks", "onnx.json")
    assert _results.result_path("x/onnx2.json", "onnx.json") == "x/onnx2.json"
    summary = _results.ratio_summary([{"model": "a", "r": 1.0}, {"model": "b", "r": 3.0}, {"model": "c", "r": 2.0}], "r")
    assert summary == {"r_median": 2.0, "r_max": 3.0, "r_max_model": "b"}
