"""Issue 7's memory target for the paged KV cache: page tables and positions at most 2% of the KV bytes.

Each slot of a page keeps its token's position (4 bytes). While the layers' page tables are the same (always, until an
eviction makes them differ) every layer's positions are the same too, so the cache allocates the first layer's alone
and every layer reads them; each layer gets its own when the tables part. With q8_0 pages at head size 64 (SmolLM2:
136 bytes of K and V per slot) positions for every layer would cost 2.94% of the KV bytes, over the target.

The cache's size line (llama-perplexity on SmolLM2 with `--kv-cache paged`, the patched CPU build) must report the
first layer's positions alone, within the target, and the share that every layer's would take; KV-Compress's tests
(test_kv_compress_cache.py) check that the layers get their own once a compression parts the tables.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness.models import get_model
from pyharness.runners.batched import parse_memory

# what parse_memory leaves out of the paged cache's size line: the layers, the K/V types and the positions' shares
SIZE_LINE = re.compile(
    r"llama_kv_cache_paged: size = .*?(\d+) layers,.*?K \((\w+)\):.*?V \((\w+)\):.*?positions: [0-9.]+ MiB "
    r"\(([0-9.]+)% of K\+V; one layer's until the layers' tables part, then ([0-9.]+)%\)"
)
PARTED = "the layers' tables parted"
MIB = 1024 * 1024
HEAD_DIM = 64  # SmolLM2-135M
ROW_BYTES = {"f16": HEAD_DIM * 2, "q8_0": HEAD_DIM // 32 * 34}  # one KV head's K (or V) row of one slot


def paged_log(cache_type: str) -> str:
    binary = evalkit.patched_cpu_binary("llama-perplexity")
    cmd = [
        str(binary), "-m", str(get_model("smollm2-135m")), "-f", str(evalkit.real_text()),
        "-c", "256", "--chunks", "1", "-t", "2", "-fa", "on", "--kv-cache", "paged",
        "-ctk", cache_type, "-ctv", cache_type, "-lv", "4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_one_layers_positions_serve_every_layer_within_the_target(cache_type: str) -> None:
    out = paged_log(cache_type)
    mem = parse_memory(out)
    m = SIZE_LINE.search(out)
    assert mem.cache == "paged" and m, "no paged cache size line with the positions' shares in the log:\n" + out[-3000:]
    n_layers = int(m[1])
    assert m[2] == m[3] == cache_type
    n_pages, page_size = mem.pages, mem.page_size
    k_mib, v_mib, pos_mib = mem.k_mib, mem.v_mib, mem.positions_mib
    share, share_every_layer = float(m[4]), float(m[5])
    assert n_pages and page_size

    assert n_layers == 30
    # one layer's positions: a float per slot of every page
    assert pos_mib == round(n_pages * page_size * 4 / MIB, 2)
    assert k_mib == v_mib == round(n_layers * n_pages * page_size * ROW_BYTES[cache_type] / MIB, 2)
    assert share <= 2.0, f"positions at {share}% of the K and V bytes"
    # what every layer's own positions would cost (and cost once the tables part): 4 bytes per 2 rows of a slot
    assert share_every_layer == pytest.approx(100 * 4 / (2 * ROW_BYTES[cache_type]), abs=0.006)
    # the first layer's share, printed to two decimals, times the layers
    assert abs(share_every_layer - share * n_layers) <= 0.005 * n_layers + 0.005
    assert PARTED not in out, "the tables parted without an eviction"
