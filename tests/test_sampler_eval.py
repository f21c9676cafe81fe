"""The `sampler` eval kind: validation, real runs on both builds into the store, and the report's latency table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyharness import matrix
from pyharness.errors import HarnessError
from pyharness.report import build_report
from pyharness.store import Store

MATRIX = """\
[matrix]
name = "sampler-test"
variants = ["upstream", "patched"]
backends = ["cpu"]
models = ["smollm2-135m"]

[[eval]]
kind = "sampler"
modes = {modes}
vocab = [2000]
rows = [1]
iters = 5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


def test_unknown_mode_names_its_line(tmp_path: Path) -> None:
    text = MATRIX.format(modes='["chain", "sorted"]')
    line = next(n for n, ln in enumerate(text.splitlines(), 1) if ln.startswith("modes"))
    with pytest.raises(HarnessError, match=rf"m.toml:{line}: modes must be a list of"):
        matrix.load_matrix(write(tmp_path, text))


def test_sampler_cells_run_once_per_build(tmp_path: Path) -> None:
    spec = matrix.load_matrix(write(tmp_path, MATRIX.format(modes='["chain", "sortfree", "op"]')))
    assert [c.label() for c in spec.cells()] == [
        "upstream-cpu sampler(chain,sortfree,op v2000 r1)",
        "patched-cpu sampler(chain,sortfree,op v2000 r1)",
    ]


@pytest.mark.slow
def test_sampler_runs_are_stored_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYHARNESS_CACHE", str(tmp_path / "cache"))
    spec = matrix.load_matrix(write(tmp_path, MATRIX.format(modes='["chain", "sortfree", "op"]')))
    with Store(tmp_path / "r.sqlite") as store:
        result = matrix.run_matrix(spec, store, builder=matrix.default_builder(True, None), progress=False)
        assert (result.ran, result.ok, result.failed) == (2, 2, [])
        metrics = {
            (variant, metric): value
            for variant, metric, value in store.conn.execute(
                "SELECT r.variant, f.metric, f.value FROM feature_eval f JOIN runs r USING (run_id)"
            )
        }
        # upstream has no sortfree sampler: its run measured the chain only
        assert {m for v, m in metrics if v == "upstream"} == {"chain vocab=2000 rows=1 median"}
        assert {m for v, m in metrics if v == "patched"} == {
            f"{mode} vocab=2000 rows=1 median" for mode in ("chain", "sortfree", "op")
        }
        assert all(value > 0 for value in metrics.values())
        report = build_report(store, matrix="sampler-test")
    row = next(ln for ln in report.markdown.splitlines() if ln.startswith("| CPU | 2000 | 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    chain, op = (
        metrics[("upstream", "chain vocab=2000 rows=1 median")],
        metrics[("patched", "op vocab=2000 rows=1 median")],
    )
    assert f"{chain:.1f}" in cells and f"{op:.1f}" in cells
    assert f"{chain / op:.1f}x" in cells  # chain / op, computed here from the stored numbers
    assert re.search(r"\| chain / op \|", report.markdown)


DECODE = """\
[matrix]
name = "decode-test"
variants = ["upstream", "patched"]
backends = ["cpu"]
models = ["smollm2-135m"]

[flags]
threads = 2

[[eval]]
kind = "decode"
samplers = ["greedy", "sortfree"]
n_gen = 6
repetitions = 1
ctx = 128
"""


@pytest.mark.slow
def test_decode_runs_are_stored_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYHARNESS_CACHE", str(tmp_path / "cache"))
    spec = matrix.load_matrix(write(tmp_path, DECODE))
    with Store(tmp_path / "r.sqlite") as store:
        result = matrix.run_matrix(spec, store, builder=matrix.default_builder(True, None), progress=False)
        assert (result.ran, result.ok, result.failed) == (2, 2, [])
        rows = store.conn.execute(
            "SELECT r.variant, f.metric, f.value FROM feature_eval f JOIN runs r USING (run_id)"
        ).fetchall()
        metrics = {(v, m): x for v, m, x in rows}
        # the upstream build has no --sampler-kernel: it measured greedy decoding only
        assert set(metrics) == {
            ("upstream", "decode greedy tokens/s"),
            ("patched", "decode greedy tokens/s"),
            ("patched", "decode sortfree tokens/s"),
        }
        assert all(x > 0 for x in metrics.values())
        report = build_report(store, matrix="decode-test")
    row = next(ln for ln in report.markdown.splitlines() if ln.startswith("| smollm2-135m | patched |"))
    ratio = metrics[("patched", "decode sortfree tokens/s")] / metrics[("patched", "decode greedy tokens/s")]
    assert f"{ratio:.3f}" in [c.strip() for c in row.strip("|").split("|")]
