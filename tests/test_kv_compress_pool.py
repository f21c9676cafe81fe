"""KV-Compress in a KV pool of fixed size (issue 8's batched target), through llama-batched-bench of the patched CPU
build.

Pages belong to layers, and KV-Compress ranks a sequence's slots across all layers, so a layer can keep more than its
share of the budget. Four sequences of 512 tokens compressed 4x every 128 positions, in a pool of 768 tokens per KV
head: without a layer cap a layer runs out while others have room, and the run must fail with a message that says so
and names the cure; with a layer cap of 1 (each layer at most its share, its heads still differing) the same run must
finish and report its throughput, and so with a head cap of 1 (each KV head at most the budget).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit
import pytest

from pyharness.models import get_model

POOL_RUN = [
    "-c", "4096", "-b", "256", "-ub", "256", "-npp", "512", "-ntg", "16", "-npl", "4", "-t", "2", "-fa", "on",
    "--kv-cache", "paged", "--kv-pool-size", "768",
    "--kv-compress", "kvc", "--kv-compress-rate", "4", "--kv-compress-every", "128",
]  # fmt: skip


def batched_bench(*extra: str) -> subprocess.CompletedProcess[str]:
    binary = evalkit.patched_cpu_binary("llama-batched-bench")
    cmd = [str(binary), "-m", str(get_model("smollm2-135m")), *POOL_RUN, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def test_kv_compress_without_a_layer_cap_runs_a_layer_out_of_pages_and_says_so() -> None:
    proc = batched_bench()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    m = re.search(
        r"lacks the pages for this batch of \d+ tokens \(free pages per layer: (\d+) to (\d+) of (\d+)\)",
        out,
    )
    assert m, out[-2000:]
    free_min, free_max, n_pages = map(int, m.groups())
    assert free_min < free_max <= n_pages, m.group(0)  # a layer short while another has room
    assert "--kv-compress-layer-cap 1" in out


@pytest.mark.parametrize("cap", ["--kv-compress-layer-cap", "--kv-compress-head-cap"])
def test_a_cap_of_one_fits_the_same_pool(cap: str) -> None:
    proc = batched_bench(cap, "1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    row = re.search(r"^\|\s+512 \|\s+16 \|\s+4 \|\s+2112 \|(.*)$", proc.stdout, re.M)
    assert row, proc.stdout[-2000:]
    speeds = [float(x) for x in row.group(1).split("|") if x.strip()]
    assert len(speeds) == 6 and all(v > 0 for v in speeds), row.group(0)
