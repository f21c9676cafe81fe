"""KV-Compress in the paged KV cache (llama_paged_seq_compress, issue 8) on SmolLM2 through llama-cpp-python
(tests/fixtures/paged_compress_probe.py, against the patched CPU build's libllama).

A budget above the sequence's length must evict nothing and leave every logits row bit for bit the uncompressed
context's; at a budget of 48 slots per head (of 128 positions), the uniform rate must return exactly the pages of
the evicted slots (every head keeps 48 slots in 6 pages of 8), KV-Compress a different set (its heads keep different
counts, so its rows differ from the uniform rate's); decoding must go on, a second compression (by rate, after
decoding) too; bad requests and contexts that cannot compress must answer -1. Two sequences compressed in one update
(a schedule) must give every row that compressing them one at a time gives, and compressing one must leave the
other's rows as they were (issue 8: "two sequences compressed in one batch never touch each other").
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_paged_kv_cache import run_probe

COMPRESS_PROBE = Path(__file__).resolve().parent / "fixtures" / "paged_compress_probe.py"
N_HEADS = 30 * 3  # SmolLM2: layers x KV heads
PAGES_PER_HEAD = 128 // 8


@pytest.fixture(scope="module")
def probe_run() -> tuple[dict[str, Any], str]:
    return run_probe(script=COMPRESS_PROBE)


@pytest.fixture(scope="module")
def result(probe_run: tuple[dict[str, Any], str]) -> dict[str, Any]:
    return probe_run[0]


def test_a_compression_gives_every_layer_its_own_positions(probe_run: tuple[dict[str, Any], str]) -> None:
    # until the tables part, the layers read the first layer's positions (tests/test_paged_kv_memory.py); KV-Compress
    # parts them, and the rows read afterwards (the tests below) need each layer's own
    log = probe_run[1]
    sizes = re.findall(r"llama_kv_cache_paged: size = .*?\(\s*(\d+) pages of (\d+) slots,\s*(\d+) layers", log)
    parted = re.findall(r"the layers' tables parted: positions for every layer, (\d+) bytes", log)
    assert sizes and parted, log[-3000:]
    # the other layers' positions, a float per slot of every page each, as the first layer's
    expected = {(int(n_layers) - 1) * int(n_pages) * int(page_size) * 4 for n_pages, page_size, n_layers in sizes}
    assert {int(p) for p in parted} <= expected, (sizes, parted)


def test_a_budget_over_the_length_changes_nothing(result: dict[str, Any]) -> None:
    r = result["budget-all"]
    assert r["freed"] == 0 and r["max_diff_vs_full"] == 0.0, r


def test_uniform_rate_returns_the_pages_of_every_heads_evicted_slots(result: dict[str, Any]) -> None:
    r = result["uniform"]
    assert r["freed"] == N_HEADS * (PAGES_PER_HEAD - 48 // 8), r
    assert r["finite"] and r["after_again"] and r["freed_again"] > 0, r


def test_kv_compress_keeps_different_counts_per_head(result: dict[str, Any]) -> None:
    r = result["kvc"]
    # the same slots in all, fewer whole pages: some heads end in partly filled pages
    assert 0 < r["freed"] < result["uniform"]["freed"], r
    assert result["kvc_vs_uniform_max_diff"] > 0.0
    assert r["finite"] and r["after_again"] and r["freed_again"] > 0, r
    # an evicting compression moves the logits, but less than dropping the middle wholesale does
    assert 0.0 < r["mean_kl_vs_full"] < result["streaming"]["mean_kl_vs_full"], result


def test_a_compressed_copy_is_the_compressed_original_and_leaves_the_source(result: dict[str, Any]) -> None:
    # the copy shares the prompt's pages: compacting it copies them first (runs of the device-side row copies that
    # read rows an earlier copy wrote), and it observed the prompt's queries through llama_memory_seq_cp
    r = result["kvc-copy"]
    assert r["max_diff_vs_kvc"] == 0.0, r
    assert r["source_max_diff_vs_full"] == 0.0, r
    # the copy's evicted pages were shared: fewer go back than when the prompt's own sequence is compressed
    assert 0 <= r["freed"] < result["kvc"]["freed"], r


def test_a_schedule_without_a_period_compresses_once_the_sequence_decodes(result: dict[str, Any]) -> None:
    # after the prompt (two ubatches of 64) nothing; after the first decoded token nothing either (that ubatch is the
    # first of one token); before the second decode the sequence is brought to its budget
    after_prompt, after_first, after_second = result["schedule-once"]["kv_bytes"]
    assert after_first >= after_prompt > 0, result["schedule-once"]
    assert after_second < after_first * 0.6, result["schedule-once"]


def test_bad_requests_and_contexts_answer_minus_one(result: dict[str, Any]) -> None:
    assert result["kvc"]["bad"] == {
        "budget_below_window": -1,
        "rate_below_1": -1,
        "no_recent": -1,
        "layer_cap_below_1": -1,
        "head_cap_below_1": -1,
    }
    assert result["no_obs"] == -1 and result["on_standard"] == -1


def test_two_sequences_compressed_in_one_update_never_touch_each_other(result: dict[str, Any]) -> None:
    r = result["two-seqs"]
    # the schedule compressed both sequences in one update: each freed pages, as one at a time does
    assert all(freed > 0 for freed in r["freed_one_at_a_time"]), r
    assert r["kv_bytes"]["scheduled"] == r["kv_bytes"]["both"], r
    assert all(s < n for s, n in zip(r["kv_bytes"]["scheduled"], r["kv_bytes"]["none"], strict=True)), r
    # together or one after the other: every row of both sequences bit for bit, and the compression changed them
    assert r["scheduled_vs_one_at_a_time"] == [0.0, 0.0], r
    assert all(d > 0.0 for d in r["scheduled_vs_none"]), r
    # compressing sequence 0 alone: its rows as when both are compressed, sequence 1's as when neither is
    assert r["first_only_seq0_vs_both"] == 0.0 and r["first_only_seq1_vs_none"] == 0.0, r


def test_a_sequence_inside_its_protected_window_is_a_logged_no_op() -> None:
    result, log = run_probe("--short", script=COMPRESS_PROBE)
    assert result == {"short": 0}
    assert "holds positions 0 to 11, all protected (16 recent, 4 sink): nothing to evict" in log
