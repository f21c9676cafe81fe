"""Issue 7's CPU exactness on a model with sliding-window layers (Gemma 3 270M: 15 of 18 layers see the last 512
positions), through llama-perplexity of the patched CPU build on the shared wikitext text.

The paged cache keeps every slot of a window layer in position order and masks what the window hides, so its
perplexity must equal, to every printed digit, that of upstream's standard cache with `--swa-full` (window layers at
full size, cells in position order): the same attention, summed in the same order. Upstream's default window cache
(n_swa + n_ubatch cells, reused as a ring) sums the same keys in another order, and the CPU's flash attention
accumulates V in f16, so its perplexity moves with the ubatch size. A context of 2048 positions makes the ring wrap:
the test also checks that the default cache differs there, so that the comparison is one that a change of order
would fail.
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


def test_paged_cache_perplexity_equals_the_full_window_caches_to_every_digit() -> None:
    paged = perplexity("--kv-cache", "paged")
    full = perplexity("--swa-full")
    ring = perplexity()
    assert paged == full, f"paged {paged} != standard --swa-full {full}"
    # the window cache as a ring sums in another order: a comparison that can tell orders apart
    assert ring != full, f"the default window cache gave {ring}, as --swa-full: the context no longer wraps the ring"
