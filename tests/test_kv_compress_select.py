"""KV-Compress's pieces that run without a model (issue 8), from the patched CPU build's test programs.

test-kv-compress checks the slot selection (llama_kv_compress_select) on planted metrics and against a full-sort
reference on random cases; test-flash-attn-paged-score checks the eviction metric op (ggml_flash_attn_paged_score)
against a double-precision reference. Both exit non-zero on any failure; this also checks that they covered what
they say they cover.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit


def test_selection_matches_planted_metrics_and_reference() -> None:
    out = evalkit.run_patched_cpu_test("test-kv-compress")
    assert "llama_kv_compress_select: all checks passed" in out, out


def test_score_op_matches_double_reference() -> None:
    out = evalkit.run_patched_cpu_test("test-flash-attn-paged-score")
    cases = [ln for ln in out.splitlines() if ln.rstrip().endswith((" OK", " FAIL"))]
    assert cases and all(ln.rstrip().endswith(" OK") for ln in cases), out
    assert re.search(rf"{len(cases)}/{len(cases)} cases passed", out), out
    covers = ("q8_0", "f16", "f32", "hs=256", "shared", "sinks", "swa=50", "softcap=30", "bias=8", "pad", "holes")
    for covered in covers:
        assert any(covered in ln for ln in cases), f"no case with {covered}"
    for ln in cases:
        nmse = float(re.search(r"nmse (\S+)", ln).group(1))
        assert nmse <= 1e-9, ln
