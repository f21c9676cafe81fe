"""Upstream's cell bookkeeping (llama_kv_cells) records how far every cell moved for the K shift: test-kv-cells of the
patched build (the series' kv-seq-div-fix patch) checks that seq_div records new - old, as seq_add does."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit


def test_position_division_records_the_move_as_addition_does() -> None:
    out = evalkit.run_patched_cpu_test("test-kv-cells")
    assert out.strip().splitlines()[-1] == "OK", out
