"""The int8 flash attention CPU reference against exact attention (test-flash-attn-int8 of the patched build).

The C++ test states the NMSE bounds (Q8_KV cache, and int8 P*V on top of it) and exits non-zero when a case is out
of them; this runs it from the patched CPU build that CI makes before the test suite.
"""

from __future__ import annotations

import subprocess

from pyharness import paths


def test_cpu_reference_is_within_its_nmse_bounds() -> None:
    binary = paths.build_root() / "patched-cpu" / "bin" / "test-flash-attn-int8"
    assert binary.is_file(), f"{binary} missing: run `pyharness build --variant patched --backend cpu` first"
    proc = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "NMSE" in ln]
    assert len(lines) >= 6 and all(ln.endswith("OK") for ln in lines), proc.stdout
    assert "all cases within bounds" in proc.stdout
