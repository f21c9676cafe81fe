"""The --kv-compress flags of the common tools (issue 8), through llama-perplexity of the patched CPU build.

A short run per method (compression every 128 positions at rate 2) must give a finite perplexity that differs from
the full cache's (or the flags did nothing), each method its own; KV-Compress observing every query since its last
compression must beat a window of the last 16, the uniform rate and StreamingLLM; a rate below 1, a budget below the
protected window or an unknown method must fail with a message that says what is wrong. A head cap of 1 (no KV head
keeps more than the budget) keeps exactly the uniform rate's choice: the same printed perplexity, and not KV-Compress's
without the cap. The head norm (each head's metric as shares of its own sum) changes KV-Compress's perplexity and not
the uniform rate's.
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

BASE = ["-c", "512", "-b", "128", "--chunks", "1", "-t", "2", "-fa", "on", "--kv-cache", "paged"]


def perplexity(*extra: str) -> subprocess.CompletedProcess[str]:
    binary = evalkit.patched_cpu_binary("llama-perplexity")
    cmd = [str(binary), "-m", str(get_model("smollm2-135m")), "-f", str(evalkit.real_text()), *BASE, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def final_estimate(proc: subprocess.CompletedProcess[str]) -> str:
    """The final perplexity as printed, with its error: "PPL +/- err"."""
    m = re.search(r"Final estimate: PPL = ([0-9.]+ \+/- [0-9.]+)", proc.stdout + proc.stderr)
    assert m, proc.stderr[-2000:]
    return m.group(1)


def final_ppl(proc: subprocess.CompletedProcess[str]) -> float:
    return float(final_estimate(proc).split()[0])


@pytest.fixture(scope="module")
def full_ppl() -> float:
    proc = perplexity()
    assert proc.returncode == 0, proc.stderr[-2000:]
    return final_ppl(proc)


def test_each_method_compresses_on_its_schedule(full_ppl: float) -> None:
    ppls = {}
    for method in ("kvc", "uniform", "streaming"):
        proc = perplexity("--kv-compress", method, "--kv-compress-rate", "2", "--kv-compress-every", "128")
        assert proc.returncode == 0, proc.stderr[-2000:]
        ppls[method] = final_ppl(proc)
    for method, ppl in ppls.items():
        assert ppl == ppl and ppl < 10 * full_ppl, (method, ppl, full_ppl)  # finite, not garbage
        assert ppl != full_ppl, f"{method}: the compression changed nothing"
    assert len(set(ppls.values())) == 3, ppls


def test_continual_kv_compress_observes_every_query_since_the_last_compression() -> None:
    """With a period, the metric sees all the queries since the last compression (KV-Compress's continual mode): at
    context 1024 and a budget of 512 slots, compressed every 128 positions, that beats a window of the last 16
    queries, the uniform rate and StreamingLLM (measured: 16.9, 20.7, 18.0 and 20.4 against 15.7 uncompressed)."""
    common = ["-c", "1024", "--chunks", "2", "--kv-compress-budget", "512", "--kv-compress-every", "128"]
    runs = {
        "kvc": ["--kv-compress", "kvc"],
        "kvc, last 16": ["--kv-compress", "kvc", "--kv-compress-obs", "16"],
        "uniform": ["--kv-compress", "uniform"],
        "streaming": ["--kv-compress", "streaming", "--kv-compress-sink", "4"],
    }
    ppls = {}
    for name, extra in runs.items():
        proc = perplexity(*common, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ppls[name] = final_ppl(proc)
    assert all(ppls["kvc"] < ppl for name, ppl in ppls.items() if name != "kvc"), ppls


def test_a_head_cap_of_one_keeps_what_the_uniform_rate_keeps() -> None:
    schedule = ["--kv-compress-rate", "2", "--kv-compress-every", "128"]
    estimates = {}
    for name, extra in {
        "kvc, head cap 1": ["--kv-compress", "kvc", "--kv-compress-head-cap", "1"],
        "uniform": ["--kv-compress", "uniform"],
        "kvc": ["--kv-compress", "kvc"],
    }.items():
        proc = perplexity(*extra, *schedule)
        assert proc.returncode == 0, proc.stderr[-2000:]
        estimates[name] = final_estimate(proc)
    assert estimates["kvc, head cap 1"] == estimates["uniform"], estimates
    assert estimates["kvc, head cap 1"] != estimates["kvc"], "the head cap changed nothing"


def test_head_norm_changes_kv_compress_and_leaves_the_uniform_rate() -> None:
    # --kv-compress-head-norm ranks each KV head's metric as shares of its own sum: KV-Compress's choice across heads
    # changes; the uniform rate ranks within each head, where a common factor changes nothing
    schedule = ["--kv-compress-rate", "2", "--kv-compress-every", "128"]
    estimates = {}
    for name, extra in {
        "kvc": ["--kv-compress", "kvc"],
        "kvc, head norm": ["--kv-compress", "kvc", "--kv-compress-head-norm"],
        "uniform": ["--kv-compress", "uniform"],
        "uniform, head norm": ["--kv-compress", "uniform", "--kv-compress-head-norm"],
    }.items():
        proc = perplexity(*extra, *schedule)
        assert proc.returncode == 0, proc.stderr[-2000:]
        estimates[name] = final_estimate(proc)
    assert estimates["kvc, head norm"] != estimates["kvc"], "the head norm changed nothing"
    assert estimates["uniform, head norm"] == estimates["uniform"], estimates


def test_bad_values_fail_with_a_message() -> None:
    proc = perplexity("--kv-compress", "kvc", "--kv-compress-rate", "0.5")
    assert proc.returncode != 0 and "--kv-compress-rate must be at least 1" in proc.stdout + proc.stderr
    proc = perplexity("--kv-compress", "kvc", "--kv-compress-budget", "8", "--kv-compress-window", "16")
    assert proc.returncode != 0 and "below the protected positions" in proc.stdout + proc.stderr
    proc = perplexity("--kv-compress", "fancy")
    assert proc.returncode != 0 and "invalid value for --kv-compress" in proc.stdout + proc.stderr
    for flag in ("--kv-compress-layer-cap", "--kv-compress-head-cap"):
        for bad in ("0.5", "nan", "-1"):
            proc = perplexity("--kv-compress", "kvc", flag, bad)
            assert proc.returncode != 0, (flag, bad)
            assert f"{flag} must be 0 (no cap) or at least 1" in proc.stdout + proc.stderr, (flag, bad)
