"""KV-Compress's head cap (`--kv-compress-head-cap`, llama_kv_compress_params.head_cap), through the patched CPU build.

A KV head keeps at most F times the budget. At F = 1 every head keeps exactly the budget, ranked within itself by the
same metric, which is the uniform rate's choice: the perplexity must be the uniform rate's to every printed digit,
and differ from KV-Compress without a cap (or the cap did nothing). A cap of 1 also fits the fixed pool that
KV-Compress without any cap runs out of (tests/test_kv_compress_pool.py). A cap below 1 must fail with a message.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness.models import get_model

BASE = ["-c", "512", "-b", "128", "--chunks", "1", "-t", "2", "-fa", "on", "--kv-cache", "paged"]
SCHEDULE = ["--kv-compress-rate", "2", "--kv-compress-every", "128"]


def perplexity(*extra: str) -> subprocess.CompletedProcess[str]:
    binary = evalkit.patched_cpu_binary("llama-perplexity")
    cmd = [str(binary), "-m", str(get_model("smollm2-135m")), "-f", str(evalkit.real_text()), *BASE, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def final_ppl(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"Final estimate: PPL = ([0-9.]+ \+/- [0-9.]+)", proc.stdout + proc.stderr)
    assert m, proc.stderr[-2000:]
    return m.group(1)


def test_a_head_cap_of_one_keeps_what_the_uniform_rate_keeps() -> None:
    capped = final_ppl(perplexity("--kv-compress", "kvc", *SCHEDULE, "--kv-compress-head-cap", "1"))
    uniform = final_ppl(perplexity("--kv-compress", "uniform", *SCHEDULE))
    free = final_ppl(perplexity("--kv-compress", "kvc", *SCHEDULE))
    assert capped == uniform, f"head cap 1: {capped}, uniform rate: {uniform}"
    assert capped != free, "the head cap changed nothing: KV-Compress without it gives the same perplexity"


def test_a_head_cap_of_one_fits_a_pool_sized_for_the_uniform_rate() -> None:
    binary = evalkit.patched_cpu_binary("llama-batched-bench")
    run = ["-c", "4096", "-b", "256", "-ub", "256", "-npp", "512", "-ntg", "16", "-npl", "4", "-t", "2", "-fa", "on"]
    run += ["--kv-cache", "paged", "--kv-pool-size", "768", "--kv-compress", "kvc", "--kv-compress-rate", "4"]
    run += ["--kv-compress-every", "128", "--kv-compress-head-cap", "1"]
    proc = subprocess.run(
        [str(binary), "-m", str(get_model("smollm2-135m")), *run], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    assert re.search(r"^\|\s+512 \|\s+16 \|\s+4 \|", proc.stdout, re.M), proc.stdout[-2000:]


def test_a_head_cap_below_one_is_refused() -> None:
    proc = perplexity("--kv-compress", "kvc", *SCHEDULE, "--kv-compress-head-cap", "0.5")
    assert proc.returncode != 0
    assert "--kv-compress-head-cap must be 0 (no cap) or at least 1" in proc.stdout + proc.stderr
