"""The int8 flash attention CPU reference against exact attention (test-flash-attn-int8 of the patched build).

The C++ test states the NMSE bounds (Q8_KV cache, and int8 P*V on top of it) and exits non-zero when a case is out
of them; this runs it from the patched CPU build that CI makes before the test suite.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit


def test_cpu_reference_is_within_its_nmse_bounds() -> None:
    out = evalkit.run_patched_cpu_test("test-flash-attn-int8")
    lines = [ln for ln in out.splitlines() if "NMSE" in ln]
    assert len(lines) >= 6 and all(ln.endswith("OK") for ln in lines), out
    assert "all cases within bounds" in out
