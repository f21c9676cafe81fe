"""Paged flash attention on the CPU against upstream's flash attention (test-flash-attn-paged of the patched build).

The C++ test scatters the keys and values of several sequences into shuffled pages (free pages, unused tails and
empty slots hold NaN), runs the paged op and ggml_flash_attn_ext over the same keys laid out densely, and exits
non-zero when a case differs: bitwise where flash_attn_ext takes its row-by-row path, within its NMSE bound
elsewhere. This runs it from the patched CPU build that CI makes before the test suite, with two seeds.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit


@pytest.mark.parametrize("seed", ["1234", "7"])
def test_paged_op_equals_flash_attn_ext_over_the_same_keys(seed: str) -> None:
    out = evalkit.run_patched_cpu_test("test-flash-attn-paged", seed)
    cases = [ln for ln in out.splitlines() if ln.startswith(("ok", "FAIL"))]
    assert len(cases) >= 100 and all(ln.startswith("ok") for ln in cases), out
    # the bitwise comparison must have covered most cases, quantized pages, GQA 8 and sliding windows among them (with
    # sinks, the last bit of some rows may differ where the compiler contracts a rescale into an FMA)
    bitwise = [ln for ln in cases if "(bitwise" in ln]
    assert len(bitwise) >= len(cases) // 2
    for needle in ("q8_0", "q8_kv", "head=16/2", "swa=64", "holes", "pad", "sinks"):
        assert any(needle in ln for ln in bitwise), f"no bitwise case with {needle}"
    assert re.search(rf"{len(cases)}/{len(cases)} cases passed", out)
