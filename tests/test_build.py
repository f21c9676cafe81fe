"""Variant builds on a small stand-in for llama.cpp: provenance, no-op rebuilds, failures that point to the log."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pyharness.build import BASE_TARGETS, METADATA_FILE, build, buildable_targets, load_build
from pyharness.errors import HarnessError
from tests.conftest import git


def test_build_records_provenance_and_rebuilds_in_seconds(fake_project: Path) -> None:
    info = build("upstream", "cpu", root=fake_project)
    for target in [t for t in BASE_TARGETS if t not in ("llama", "ggml")]:
        assert info.tool(target).is_file()
    meta = json.loads((fake_project / "build" / "upstream-cpu" / METADATA_FILE).read_text())
    assert meta["source_commit"] == git(fake_project / "vendor" / "llama.cpp", "rev-parse", "upstream")
    assert meta["upstream_commit"] == meta["source_commit"]
    assert meta["targets"] == list(BASE_TARGETS)
    assert "-DCMAKE_BUILD_TYPE=Release" in meta["cmake_flags"]
    assert meta["compiler"] and meta["series_hash"] == "none"
    assert load_build("upstream", "cpu", root=fake_project).source_commit == info.source_commit
    started = time.monotonic()
    build("upstream", "cpu", root=fake_project)
    assert time.monotonic() - started < 10
    log = (fake_project / "build" / "upstream-cpu" / "build.log").read_text()
    assert "no work to do" in log


def test_patched_variant_builds_from_its_own_tree(fake_project: Path) -> None:
    info = build("patched", "cpu", root=fake_project)
    assert info.series_in_sync
    assert (fake_project / "vendor" / "trees" / "patched" / "ggml.c").is_file()


def test_failed_build_points_to_its_log_and_leaves_no_metadata(fake_project: Path) -> None:
    build("upstream", "cpu", root=fake_project)
    repo = fake_project / "vendor" / "llama.cpp"
    (repo / "ggml.c").write_text("int ggml_answer(void) { return 42 }\n")
    git(repo, "commit", "--quiet", "-am", "break the build")
    pin = fake_project / "vendor" / "pin.toml"
    old = git(repo, "rev-parse", "HEAD~1")
    pin.write_text(pin.read_text().replace(old, git(repo, "rev-parse", "HEAD")))
    with pytest.raises(HarnessError, match="failed") as info:
        build("upstream", "cpu", root=fake_project)
    log = fake_project / "build" / "upstream-cpu" / "build.log"
    assert str(log) in str(info.value)
    assert "error:" in log.read_text() and "ggml.c" in log.read_text()
    assert not (fake_project / "build" / "upstream-cpu" / METADATA_FILE).exists()
    with pytest.raises(HarnessError, match="pyharness build --variant upstream"):
        load_build("upstream", "cpu", root=fake_project)


@pytest.mark.parametrize(
    ("variant", "backend", "word"), [("nightly", "cpu", "variant"), ("upstream", "rocm", "backend")]
)
def test_unknown_variant_or_backend(fake_project: Path, variant: str, backend: str, word: str) -> None:
    with pytest.raises(HarnessError, match=f"unknown {word}"):
        build(variant, backend, root=fake_project)
    assert not (fake_project / "build").exists()


def test_real_upstream_build_has_the_harness_tools() -> None:
    info = load_build("upstream", "cpu")
    for tool in ("llama-bench", "llama-perplexity", "test-backend-ops"):
        assert info.tool(tool).is_file()
    assert info.upstream_commit == "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


def test_targets_whose_sources_a_packed_tree_lacks_are_not_built(tmp_path: Path) -> None:
    """llama-server needs tools/ui/CMakeLists.txt (LLAMA_BUILD_SERVER on adds it); a `pyharness pack` tree has none."""
    tree = tmp_path / "tree"
    (tree / "tools" / "server").mkdir(parents=True)
    (tree / "tools" / "server" / "CMakeLists.txt").write_text("")
    kept, skipped = buildable_targets(["llama", "llama-server", "llama-bench"], tree)
    assert kept == ["llama", "llama-bench"]
    assert len(skipped) == 1 and "llama-server" in skipped[0] and "tools/ui/CMakeLists.txt" in skipped[0]

    (tree / "tools" / "ui").mkdir()
    (tree / "tools" / "ui" / "CMakeLists.txt").write_text("")
    assert buildable_targets(["llama", "llama-server"], tree) == (["llama", "llama-server"], [])


def test_a_features_test_program_missing_at_an_earlier_patch_is_not_built(tmp_path: Path) -> None:
    """A tree at a patch of the series before the one that adds a feature's test program (tests/<name>.cpp) builds the
    rest: `pyharness build` of one stage of the series (scripts/gpu-check build-stage)."""
    tree = tmp_path / "tree"
    (tree / "tests").mkdir(parents=True)
    (tree / "tests" / "test-kv-pages.cpp").write_text("")
    names = ["test-backend-ops", "test-kv-pages", "test-kv-compress", "test-flash-attn-paged-score"]
    kept, skipped = buildable_targets(names, tree)
    # test-backend-ops is upstream's (BASE_TARGETS): always built, as upstream's CMake defines it
    assert kept == ["test-backend-ops", "test-kv-pages"]
    assert len(skipped) == 2 and "tests/test-flash-attn-paged-score.cpp" in skipped[1]

    (tree / "tests" / "test-kv-compress.cpp").write_text("")
    (tree / "tests" / "test-flash-attn-paged-score.cpp").write_text("")
    assert buildable_targets(names, tree) == (names, [])
