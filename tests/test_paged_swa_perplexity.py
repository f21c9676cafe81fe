"""Issue 7's CPU exactness on a model with sliding-window layers (Gemma 3 270M: 15 of 18 layers see the last 512
positions), through llama-perplexity of the patched CPU build on the shared wikitext text.

By default the paged cache keeps a model's window layers in upstream's window cache (n_swa + n_ubatch cells, reused
as a ring; llama_kv_cache_paged_iswa) and pages the other layers, so its perplexity must equal upstream's default
cache's to every printed digit. With `--swa-full` the paged cache pages the window layers too, keeping every slot in
position order and masking what the window hides: then it must equal upstream's `--swa-full` (window layers at full
size, cells in position order). The two upstream caches sum the same keys in another order once the ring wraps, and
the CPU's flash attention accumulates V in f16, so their perplexities differ at a context of 2048 positions: the test
checks that too, so that each comparison is one that a change of order would fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness.models import get_model
from pyharness.runners.perplexity import parse_final_estimate

RUN = ["-c", "2048", "--chunks", "1", "-b", "2048", "-ub", "512", "-t", "2", "-fa", "on"]


def perplexity(*extra: str) -> float:
    """The printed perplexity (equal printed digits parse to equal floats)."""
    binary = evalkit.patched_cpu_binary("llama-perplexity")
    cmd = [str(binary), "-m", str(get_model("gemma3-270m")), "-f", str(evalkit.real_text()), *RUN, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return parse_final_estimate(out)["ppl"]


def test_paged_cache_perplexity_equals_upstreams_to_every_digit() -> None:
    paged = perplexity("--kv-cache", "paged")
    ring = perplexity()
    paged_full = perplexity("--kv-cache", "paged", "--swa-full")
    full = perplexity("--swa-full")
    assert paged == ring, f"paged {paged} != upstream's default cache {ring}"
    assert paged_full == full, f"paged --swa-full {paged_full} != upstream --swa-full {full}"
    # the window cache as a ring sums in another order: comparisons that can tell the two caches apart
    assert ring != full, f"the default window cache gave {ring}, as --swa-full: the context no longer wraps the ring"
