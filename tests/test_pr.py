"""`pyharness pr`: the real sampler patches as an upstream stack that builds, with the store's tables inside."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pyharness.errors import HarnessError
from pyharness.patches import read_series
from pyharness.pr import load_feature, make_pr, stage_has_test
from pyharness.store import FeatureEval, RunRecord, Store
from tests.conftest import ROOT, git

FEATURE = "sortfree-sampler"


def store_with_evidence(path: Path) -> float:
    value = 12.375
    with Store(path) as store:
        store.record(
            RunRecord(
                fields={
                    "kind": "feature",
                    "status": "ok",
                    "config_hash": "test-evidence",
                    "config": {"feature": FEATURE},
                    "params": {},
                    "matrix": "sampler-cpu",
                    "variant": "patched",
                    "backend": "cpu",
                    "upstream_commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f",
                    "series_hash": "test",
                    "series_in_sync": 1,
                    "host_cpu": "test cpu",
                    "source_commit": "1" * 40,
                    "compiler": "test compiler",
                    "cmake_flags": "[]",
                },
                feature_evals=[FeatureEval(FEATURE, "op latency 151936x1", value, "us")],
            )
        )
    return value


def test_unknown_feature_names_the_known_ones() -> None:
    with pytest.raises(HarnessError, match=FEATURE):
        load_feature("no-such-feature", ROOT)


def test_stack_builds_stage_by_stage_and_carries_the_evidence(tmp_path: Path) -> None:
    value = store_with_evidence(tmp_path / "store.sqlite")
    out = make_pr(FEATURE, db=tmp_path / "store.sqlite", root=ROOT)
    patches = [e.file for e in read_series(ROOT / "patches") if e.feature == FEATURE]
    stages = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(stages) == len(patches)
    repo = ROOT / "vendor" / "llama.cpp"
    previous = git(repo, "rev-parse", "upstream")
    for stage in stages:
        branch = f"pr/{FEATURE}/{stage.name}"
        assert git(repo, "rev-parse", f"{branch}~1") == previous  # a stack on the pinned upstream
        previous = git(repo, "rev-parse", branch)
        exported = list(stage.glob("*.patch"))
        assert len(exported) == 1 and "Subject: [PATCH]" in exported[0].read_text()
    text = (out / "description.md").read_text()
    for heading in ("## Motivation", "## Design", "## The stack", "## How it was tested", "## Use of AI tools"):
        assert heading in text
    assert "| 1 | `build` | ok |" in text
    assert "| 1 | `test-backend-ops -o SAMPLE_SORTFREE` | ok |" in text
    assert f"{value}" in text or f"{value:.2f}" in text


def test_evidence_takes_each_matrix_from_the_first_store_that_has_it(tmp_path: Path) -> None:
    from pyharness.pr import Feature, evidence

    value = store_with_evidence(tmp_path / "gpu.sqlite")
    with Store(tmp_path / "empty.sqlite"):
        pass
    feature = Feature(name=FEATURE, title="t", motivation="", design="", matrices=["sampler-cpu", "no-such-matrix"])
    text = evidence(feature, [tmp_path / "empty.sqlite", tmp_path / "gpu.sqlite"])
    assert f"{value}" in text or f"{value:.2f}" in text
    assert "No runs of matrix `no-such-matrix`" in text
    # the first store has no runs of sampler-cpu: without the second, the table is missing
    assert "No runs of matrix `sampler-cpu`" in evidence(feature, [tmp_path / "empty.sqlite"])


def test_evidence_refuses_a_store_that_does_not_exist(tmp_path: Path) -> None:
    from pyharness.pr import Feature, evidence

    feature = Feature(name=FEATURE, title="t", motivation="", design="", matrices=["sampler-cpu"])
    with pytest.raises(HarnessError, match="no results store"):
        evidence(feature, [tmp_path / "missing.sqlite"])
    assert not (tmp_path / "missing.sqlite").exists()


def test_a_stack_cannot_depend_on_a_feature_without_patches() -> None:
    from pyharness.pr import Feature, build_stack

    feature = Feature(name=FEATURE, title="t", motivation="", design="", depends=["no-such-feature"])
    with pytest.raises(HarnessError, match="depends on 'no-such-feature'"):
        build_stack(feature, ROOT)


def test_a_stack_sits_on_its_dependencies_and_theirs(tmp_path: Path) -> None:
    # kv-compress names paged-kv only; paged-kv's patches apply on top of the sampler's and the int8 attention's
    kv = load_feature("kv-compress", ROOT)
    assert kv.depends == ["sortfree-sampler", "int8-flash-attn", "paged-kv"]
    root = tmp_path / "root"
    (root / "patches").mkdir(parents=True)
    (root / "patches" / "features.toml").write_text(
        '[features.a]\ndepends = ["b"]\n[features.b]\ndepends = ["a"]\n', encoding="utf-8"
    )
    with pytest.raises(HarnessError, match="cycle: a -> b -> a"):
        load_feature("a", root)


def test_evidence_leaves_the_stores_unchanged(tmp_path: Path) -> None:
    from pyharness.pr import Feature, evidence

    store_with_evidence(tmp_path / "gpu.sqlite")
    # a store of an older schema (no kv_memory table yet): opening it in place would add the table
    with sqlite3.connect(tmp_path / "gpu.sqlite") as conn:
        conn.execute("DROP TABLE kv_memory")
    before = (tmp_path / "gpu.sqlite").read_bytes()
    feature = Feature(name=FEATURE, title="t", motivation="", design="", matrices=["sampler-cpu"])
    evidence(feature, [tmp_path / "gpu.sqlite"])
    assert (tmp_path / "gpu.sqlite").read_bytes() == before


def test_a_stage_runs_only_the_tests_its_own_tree_has(tmp_path: Path) -> None:
    # the shared build folder can hold a later stage's test binary: whether a stage has a test is read from its tree
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    git(repo.parent, "init", "-q", str(repo))
    (repo / "tests" / "test-a.cpp").write_text("int main() { return 0; }\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a")
    first = git(repo, "rev-parse", "HEAD")
    (repo / "tests" / "test-b.cpp").write_text("int main() { return 0; }\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "b")
    second = git(repo, "rev-parse", "HEAD")
    assert stage_has_test(repo, first, "test-a")
    assert not stage_has_test(repo, first, "test-b")
    assert stage_has_test(repo, second, "test-b")
