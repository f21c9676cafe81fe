"""The paged KV cache (--kv-cache paged, llama_init_from_model_paged) against the standard cache, in-process through
llama-cpp-python on the patched CPU build (tests/fixtures/paged_probe.py does the decoding; it prints JSON). Four
sequences decode greedily together, one of them a copy of another's prompt (llama_memory_seq_cp shares its pages).
Every logits row read must be bitwise the standard cache's and the greedy tokens identical. With a seq_rm of one
sequence's last tokens, the other sequences must not notice and that sequence must replay its rows exactly. A
context shift (seq_rm + seq_add) and a seq_div rotate the paged keys as the standard cache's shift does
(tests/fixtures/paged_shift_probe.py). A copy of a range that is not a prefix reads as the standard cache's copy does
(tests/fixtures/paged_range_copy_probe.py). A pool too small fails the batch with llama_decode's "no memory slot" status
and leaves every sequence as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pyharness.bindings import library_dir
from pyharness.models import get_model
from pyharness.paged_generation import PROMPTS
from pyharness.paged_server import ServerConfig, run_trials, summarize

PROBE = Path(__file__).resolve().parent / "fixtures" / "paged_probe.py"
SHIFT_PROBE = Path(__file__).resolve().parent / "fixtures" / "paged_shift_probe.py"
UBATCH_PROBE = Path(__file__).resolve().parent / "fixtures" / "paged_ubatch_probe.py"
EVICT_PROBE = Path(__file__).resolve().parent / "fixtures" / "paged_evict_probe.py"
RANGE_COPY_PROBE = Path(__file__).resolve().parent / "fixtures" / "paged_range_copy_probe.py"


def run_probe(*args: str, script: Path = PROBE) -> tuple[dict[str, Any], str]:
    """A probe script run on SmolLM2 against the patched build's libllama: its JSON line, and its stderr (the log)"""
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(library_dir("patched"))}
    proc = subprocess.run(
        [sys.executable, str(script), str(get_model("smollm2-135m")), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, proc.stderr


def probe(*args: str, script: Path = PROBE) -> dict[str, Any]:
    return run_probe(*args, script=script)[0]


def test_paged_cache_gives_the_standard_caches_logits_bit_for_bit() -> None:
    r = probe()
    assert r["decode_failed"] == [[], [], [], [], []]
    assert r["rows"] > 150 and r["tokens_generated"] == 3 * 48 + 24
    assert r["bitwise_equal"], "a logits row differs from the standard cache's"
    assert r["greedy_identical"]
    assert r["pos_max"]["paged"] == r["pos_max"]["standard"]
    # seq_rm of sequence 1: the others unchanged, sequence 1 replays its rows
    assert r["rm_others_unchanged"] and r["rm_replay_equal"]


def test_a_batch_of_several_sequences_is_cut_into_the_standard_caches_ubatches() -> None:
    # on CUDA a ubatch's shape picks the kernels and their rounding: cut differently, llama-perplexity's batches of 4
    # sequences gave a mean KLD of 0.019 between the caches (docs/design/paged-kv.md, "Ubatches as upstream cuts them")
    r = probe(script=UBATCH_PROBE)
    for mode in ("streams", "unified"):
        assert r[mode]["rc"] == {"standard": 0, "paged": 0}
        ub = r[mode]["ubatches"]
        assert sum(ub["standard"]) == r["n_tokens"], ub
        assert ub["paged"] == ub["standard"], f"{mode}: the paged cache cut the batch as {ub['paged']}"
        assert r[mode]["bitwise_equal"]
    # a stream per sequence: equal runs per sequence, not n_ubatch tokens at a time
    assert r["streams"]["ubatches"]["standard"] != r["unified"]["ubatches"]["standard"]


def test_context_shift_and_position_division_rotate_keys_as_the_standard_cache() -> None:
    """seq_rm + seq_add (llama-cli's context shift) and seq_div on pages shared with another sequence: the rows read
    afterwards match the standard cache's up to the rounding of a different key order (about 1 in logits of about
    40), where keys left unrotated put them about 25 apart (measured by skipping the rotation)."""
    r = probe(script=SHIFT_PROBE)
    assert r["can_shift"] == {"standard": True, "paged": True}
    assert r["pos_max"]["paged"] == r["pos_max"]["standard"]
    for phase in ("after_add", "after_div"):
        assert r[phase]["rows"] == 24
        assert r[phase]["max_abs_diff"] < 4.0, (phase, r[phase])


def test_the_standard_caches_own_seq_div_rotates_keys_as_the_paged_cache() -> None:
    # upstream's seq_div recorded old - new as the move (rows 20.4 apart from the paged cache's after it); the series'
    # kv-seq-div-fix patch records new - old, as seq_add does
    r = probe("--standard-div", script=SHIFT_PROBE)
    assert r["after_div"]["rows"] == 24
    assert r["after_div"]["max_abs_diff"] < 4.0, r["after_div"]


def test_streaming_eviction_attends_as_the_standard_cache_with_the_middle_removed() -> None:
    # issue 8's StreamingLLM baseline: 60 tokens in pages of 8 slots, 4 sinks and 16 recent kept in each of the 90
    # (layer, KV head) tables: 8 pages become 3, and the rows read afterwards are the standard cache's after seq_rm of
    # the middle up to the order the keys are summed in (the paged cache without the eviction stands about 10 apart)
    r = probe(script=EVICT_PROBE)
    assert r["freed"] == 30 * 3 * (8 - 3)
    assert r["pos"]["paged"] == r["pos"]["standard"] == [0, 59]
    assert r["evicted_vs_standard_rm"] < 2.0, r
    assert r["full_vs_standard_rm"] > 4 * r["evicted_vs_standard_rm"], r
    # a state saved right after the eviction holds the compacted cells (the copies ran before it was written)
    assert r["saved_vs_standard_rm"] < 2.0 and r["full_vs_standard_rm"] > 4 * r["saved_vs_standard_rm"], r
    assert r["greedy_identical"]
    assert r["bad_recent"] == -1 and r["on_standard"] == -1  # bad input and a standard context: refused


def test_a_pool_too_small_fails_the_batch_and_changes_nothing() -> None:
    # 16 tokens per KV head: one page of 64 slots, and a partly filled last page per (sequence, head): 5 pages per KV
    # head for the 4 sequences, so they run out of pages somewhere past 64 tokens
    r = probe("--paged-only", "--pool-tokens", "16", "--n-gen", "80")
    assert r["decode_failed"] == [1], "llama_decode should report no memory slot (1)"
    failed = r["failed_at"]
    assert 20 < failed["step"] < 80
    assert r["pos_max"] == [p - 1 for p in failed["next_pos"]], "the failed batch left tokens behind"


def test_a_server_whose_context_the_sequences_fill_answers_as_with_the_standard_cache() -> None:
    """llama-server -kvu -c 256 --parallel 3, three requests at once of 72 tokens each after their prompts: about 240
    tokens, which the standard cache holds in its 256 cells. Every sequence ends in a partly filled page of 64 slots
    (2 pages of each KV head each, 6 in all), so the paged pool needs its page of slack per sequence beyond the 4
    pages of 256 tokens; without it the server runs out of memory slots and fails the requests."""
    config = ServerConfig(prompts=list(PROMPTS[:3]), parallel=3, n_predict=72, ctx=256, extra=["-kvu"])
    binary = library_dir("patched") / "llama-server"
    trials = run_trials(binary, get_model("smollm2-135m"), config, modes=("concurrent",), repeats=1)
    summary = summarize(trials)
    failed = [t.log_tail[-2000:] for t in trials if t.answered < len(config.prompts)]
    assert summary["answered"] == {"standard concurrent": [3, 3], "paged concurrent": [3, 3]}, failed
    assert all(t.paged_active for t in trials if t.cache == "paged")
    assert all(len(a.tokens) == config.n_predict for t in trials for a in t.answers)
    for t in trials:
        full = [p for p in t.problems if "failed to find free space" in p or "purging slot" in p]
        assert not full, f"{t.cache}: {full}"
    # where the prompts began in the same batches (as a rule: all three in the first), the same answers
    assert all(pair[4] for pair in summary["same_batches"]), summary["batches"]


def test_a_copy_of_a_range_that_is_not_a_prefix_reads_as_the_standard_caches() -> None:
    # positions [9, 33) of a 40-token prompt: the copy shares pages of 16 slots with its source, then evicts the slots
    # before 9 (the pages it writes copied first); its state, saved right after, holds the moved rows
    r = probe(script=RANGE_COPY_PROBE)
    assert r["pos_range"]["paged"] == r["pos_range"]["standard"] == [9, 32]
    assert r["rows"] == 24
    assert r["copy_equal"], "the copy's rows differ from the standard cache's copy"
    assert r["source_equal"], "the source's rows changed with the copy"
    assert r["restored_standard_equal"]  # the probe's own check on the standard cache
    assert r["restored_equal"], "the copy's state, saved after seq_cp, lacks rows the copy moved"
