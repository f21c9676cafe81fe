"""The paged KV cache's bookkeeping (llama_kv_pages) under random operations (test-kv-pages of the patched build).

The C++ test runs appends, removals, prefix copies, keeps and clears on small pools against a plain model of every
sequence's tokens, with a simulated device memory, and exits non-zero when a sequence reads other tokens than its own,
a reference count is off or a refused operation changed something. This runs it with two seeds and checks that the
runs exercised full pools and shared pages (page copies).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from pyharness import paths


@pytest.mark.parametrize("seed", ["42", "7"])
def test_pages_hold_exactly_each_sequences_tokens(seed: str) -> None:
    binary = paths.build_root() / "patched-cpu" / "bin" / "test-kv-pages"
    assert binary.is_file(), f"{binary} missing: run `pyharness build --variant patched --backend cpu` first"
    proc = subprocess.run([str(binary), seed], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ok", "FAIL"))]
    assert len(runs) >= 20 and all(ln.startswith("ok") for ln in runs), proc.stdout
    refused = [int(m) for m in re.findall(r"(\d+) appends refused", proc.stdout)]
    copies = [int(m) for m in re.findall(r"(\d+) page copies", proc.stdout)]
    assert sum(refused) > 0, "no run filled its pool"
    assert sum(c > 0 for c in copies) >= len(copies) // 2, "shared pages were rarely written"
    assert re.search(rf"{len(runs)}/{len(runs)} runs passed", proc.stdout)
