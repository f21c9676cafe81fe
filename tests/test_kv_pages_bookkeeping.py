"""The paged KV cache's bookkeeping (llama_kv_pages) under random operations (test-kv-pages of the patched build).

The C++ test runs appends, removals, prefix copies, keeps and clears on small pools against a plain model of every
sequence's tokens, with a simulated device memory, and exits non-zero when a sequence reads other tokens than its own,
a reference count is off or a refused operation changed something. This runs it with two seeds and checks that the
runs exercised full pools and shared pages (page copies).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit


@pytest.mark.parametrize("seed", ["42", "7"])
def test_pages_hold_exactly_each_sequences_tokens(seed: str) -> None:
    out = evalkit.run_patched_cpu_test("test-kv-pages", seed)
    runs = [ln for ln in out.splitlines() if ln.startswith(("ok", "FAIL"))]
    assert len(runs) >= 20 and all(ln.startswith("ok") for ln in runs), out
    refused = [int(m) for m in re.findall(r"(\d+) appends refused", out)]
    copies = [int(m) for m in re.findall(r"(\d+) page copies", out)]
    assert sum(refused) > 0, "no run filled its pool"
    assert sum(c > 0 for c in copies) >= len(copies) // 2, "shared pages were rarely written"
    assert re.search(rf"{len(runs)}/{len(runs)} runs passed", out)
    # evictions (issue 8's bookkeeping) ran and compacted: rows moved to fill the evicted slots
    moved = [int(m) for m in re.findall(r"\d+ evictions \((\d+) rows moved\)", out)]
    assert len(moved) == len(runs) - 3 and sum(m > 0 for m in moved) >= len(moved) // 2, out
