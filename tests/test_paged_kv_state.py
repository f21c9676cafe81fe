"""The paged KV cache (llama_init_from_model_paged) with tokens of several sequences, state save/load and pages given
back, against the standard cache, in-process through llama-cpp-python on the patched CPU build
(tests/fixtures/paged_state_probe.py does the decoding; it prints JSON).

- A prompt of several sequences at once (llama_batch tokens with n_seq_id > 1, as llama-batched decodes it), a ubatch
  of tokens of some of them and a token of two sequences whose pages differ: every logits row bitwise the standard
  cache's. The prompt's pages are shared: 4 sequences fit a pool that holds it once, and a batch past the pool fails
  and leaves every sequence as it was.
- llama_state_seq_* and llama_state_* between paged and standard contexts, both ways (unified or not, V transposed or
  not): the context that loads a state goes on with bitwise the logits of the one that saved it, and writes back the
  bytes it read. With sliding-window layers (Gemma 3) the state has llama_kv_cache_iswa's format.
- Gemma 3 without a state, on one thread: bitwise the logits of the standard cache, by default (both keep the window
  layers in upstream's window cache, a ring past its size) and with swa_full (every cell of the window layers kept), in
  flash attention's row-by-row path and its tiled one (tiles spanning pages); the same first position reported.
- States of another layout (another model, q8_0 keys), truncated, or larger than the pool: refused, the context as it
  was.
- llama_memory_seq_keep and llama_memory_clear give pages back to the pool, and the memory breakdown that the tools
  print at the end reports the pages in use.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyharness.bindings import library_dir
from pyharness.models import get_model

PROBE = Path(__file__).resolve().parent / "fixtures" / "paged_state_probe.py"

# contexts whose attention adds the same keys in another order or with other kernels: close, not bitwise. Without
# flash attention the standard cache runs soft_max over all of its cells (the paged cache always runs flash
# attention); Gemma 3 decoding past 512 cells on two threads: the standard cache splits a single token's keys among
# the threads and merges the parts, which moves its logits by up to about 1.3 (it is then off its own one-thread
# result by as much; see "against_standard" below). A state read wrong gives differences of 20 and more
KERNEL_TOLERANCE = 2.0


def probe(*args: str) -> dict[str, Any]:
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(library_dir("patched"))}
    proc = subprocess.run(
        [sys.executable, str(PROBE), *args], capture_output=True, text=True, env=env, timeout=1200, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    return probe("state", str(get_model("smollm2-135m")))


def test_tokens_of_several_sequences_go_into_each_of_them() -> None:
    r = probe("shared", str(get_model("smollm2-135m")))
    assert r["rows"] > 80
    assert r["bitwise_equal"], "a logits row differs from the standard cache's"
    assert r["greedy_identical"]
    assert r["pos_max"]["paged"] == r["pos_max"]["standard"]
    pool = r["pool"]
    assert pool["fits"], "the shared prompt did not fit a pool that holds it once: its pages are not shared"
    assert pool["over_failed"] and pool["unchanged"], "a batch past the pool must fail and change nothing"
    assert pool["then_one_more"], "the failed batch left pages behind"


@pytest.mark.parametrize(
    "case",
    [
        "paged_to_standard",
        "standard_to_paged",
        "paged_to_paged",
        "paged_to_standard_not_unified",
        "standard_to_paged_not_unified",
    ],
)
def test_sequence_states_move_between_paged_and_standard_contexts(state: dict[str, Any], case: str) -> None:
    r = state["seq"][case]
    assert r["read"], "the state was not loaded"
    assert r["pos_range"], "the loaded sequence holds other positions"
    assert r["bitwise_equal"], f"the loading context goes on with other logits (max abs diff {r['max_abs_diff']})"
    assert r["bytes_identical"], "the loading context writes back another state"


def test_sequence_states_with_v_transposed(state: dict[str, Any]) -> None:
    # without flash attention the standard cache's states hold V transposed: the paged cache reads and writes them
    for case in ("standard_to_paged_v_trans", "paged_to_standard_v_trans"):
        r = state["seq"][case]
        assert r["read"] and r["pos_range"] and r["bytes_identical"], case
        assert r["max_abs_diff"] < KERNEL_TOLERANCE, case
    # standard -> paged (reads V transposed) -> paged (writes it not transposed) -> paged (reads that, writes V
    # transposed) -> standard: goes on bitwise as a standard context that loaded the first state
    chain = state["seq"]["standard_paged_standard_v_trans"]
    assert chain["read"]
    assert chain["bitwise_equal"], "V did not survive paged contexts reading and writing it transposed and not"
    assert chain["max_abs_diff"] < KERNEL_TOLERANCE and chain["middle_max_abs_diff"] < KERNEL_TOLERANCE


def test_sequence_states_kept_on_device(state: dict[str, Any]) -> None:
    r = state["on_device"]
    assert r["read"] and r["bitwise_equal"]


@pytest.mark.parametrize("case", ["paged_to_standard", "standard_to_paged", "paged_to_paged"])
def test_whole_context_states_move_between_paged_and_standard_contexts(state: dict[str, Any], case: str) -> None:
    r = state["whole"][case]
    assert r["read"] and r["pos_ranges"]
    assert r["bitwise_equal"], f"the loading context goes on with other logits (max abs diff {r['max_abs_diff']})"


def test_states_of_a_model_with_sliding_window_layers() -> None:
    r = probe("swa", str(get_model("gemma3-270m")))
    assert r["tokens"] > 512, "the prompt must be longer than the window"
    # one thread: every round trip goes on with bitwise the logits of the context that saved the state
    for case in ("paged_to_paged", "paged_standard_paged", "paged_to_standard", "standard_to_paged"):
        assert r[case]["read"] and r[case]["bitwise_equal"], f"{case}: max abs diff {r[case]['max_abs_diff']}"
    assert r["no_state_max_abs_diff"] < KERNEL_TOLERANCE
    # one thread, against the standard cache that holds the window layers alike (its window cache by default, every
    # cell in order with swa_full): bitwise, in flash attention's row-by-row path (ubatch 32) and its tiled one
    # (ubatch 512, tiles spanning several pages of 16 slots)
    assert len(r["against_standard"]) == 4
    for ubatch, cmp in r["against_standard"].items():
        assert cmp["bitwise_equal"], f"{ubatch}: max abs diff {cmp['max_abs_diff']}"
    # past the window cache's size it reuses cells as a ring: the default caches agree with each other bitwise and
    # report the same first position, as do the swa_full ones; the two kinds differ, so the comparisons can fail
    wrap = r["wrap"]
    assert wrap["tokens"] > 768 + 64, "the prompt must wrap the window cache's ring"
    assert not wrap["standard_vs_standard_swa_full"]["bitwise_equal"], "the ring no longer changes the order"
    assert wrap["paged_vs_standard"]["bitwise_equal"], wrap["paged_vs_standard"]
    assert wrap["paged_swa_full_vs_standard_swa_full"]["bitwise_equal"], wrap["paged_swa_full_vs_standard_swa_full"]
    assert wrap["paged_pos_min"] == wrap["standard_pos_min"] > 0
    assert wrap["paged_swa_full_pos_min"] == wrap["standard_swa_full_pos_min"] == 0
    assert r["partial_checkpoint"]["read"] and r["partial_checkpoint"]["bitwise_equal"]


def test_several_sequences_of_a_model_with_sliding_window_layers() -> None:
    # Gemma 3 as llama-server decodes it: four prompts in one batch, then a token of each sequence per step; the paged
    # cache (its window layers in upstream's window cache) gives bitwise the standard cache's logits, on one and two
    # threads, with one stream or one per sequence
    r = probe("multi", str(get_model("gemma3-270m")))
    assert len(r) == 4
    for case, cmp in r.items():
        assert cmp["bitwise_equal"], f"{case}: max abs diff {cmp['max_abs_diff']}"


def test_states_that_do_not_fit_are_refused_and_change_nothing() -> None:
    r = probe("bad", str(get_model("smollm2-135m")), str(get_model("gemma3-270m")))
    assert r["read"] == {
        "other_model": 0,
        "q8_0_keys": 0,
        "truncated": 0,
        "larger_than_pool": 0,
        "whole_other_model": 0,
    }
    assert r["positions_unchanged"] and r["unchanged"], "a refused state changed the context"
    assert r["fits"], "the state that was too large for the pool must load where it fits"


def completion_log(model: str, n_predict: int, n_ctx: int, *extra: str) -> str:
    """the log of the patched build's llama-completion (-v) over a short prompt, greedy, two threads"""
    exe = library_dir("patched") / "llama-completion"
    args = ["-m", str(get_model(model)), "-p", "The history of the Roman Empire", "-n", str(n_predict)]
    args += ["-c", str(n_ctx), "-t", "2", "-no-cnv", "--temp", "0", "-v", *extra]
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_memory_breakdown_reports_the_pages_in_use() -> None:
    # llama-completion prints the memory breakdown at the end (with -v): the paged cache logs its pages in use there
    log = completion_log("smollm2-135m", 20, 512, "--kv-cache", "paged", "--kv-page-size", "16")
    used = re.search(r"paged KV cache: (\d+) of (\d+) pages in use", log)
    tokens = re.search(r"total time = .* / +(\d+) tokens", log)
    seqs = re.search(r"llama_kv_cache_paged: size = .* layers, +(\d+) seqs\)", log)
    assert used and tokens and seqs, log[-3000:]
    # SmolLM2-135M: 30 layers of 3 KV heads; a pool of n_ctx = 512 tokens per KV head in pages of 16 slots, and a
    # partly filled last page per (sequence, KV head)
    n_tokens = int(tokens.group(1))
    assert int(used.group(1)) == 30 * 3 * ((n_tokens + 15) // 16)
    assert int(used.group(2)) == 30 * 3 * (512 // 16 + int(seqs.group(1)))


def kv_buffer_mib(*extra: str) -> float:
    """the KV buffers llama-completion allocates for Gemma 3 270M at a context of 8192 (every cache logs each of its
    buffers: the paged pools with their positions, the standard caches' K and V)"""
    log = completion_log("gemma3-270m", 1, 8192, *extra)
    sizes = re.findall(r"KV buffer size = +([0-9.]+) MiB", log)
    assert sizes, log[-3000:]
    return sum(float(x) for x in sizes)


def test_window_layers_take_what_upstreams_window_cache_takes() -> None:
    # Gemma 3 270M: 15 of 18 layers see the last 512 positions. By default the paged cache leaves them in upstream's
    # window cache (pad(512 + n_ubatch, 256) cells) and pages the 3 others: its KV memory is the standard cache's but
    # for the pages' rounding and positions (a partly filled last page per KV head: 64 slots of 8192, and 4 bytes per
    # slot beside the 1 KiB of K and V); with --swa-full it pages every layer at full size, as upstream's --swa-full
    standard = kv_buffer_mib()
    paged = kv_buffer_mib("--kv-cache", "paged")
    paged_full = kv_buffer_mib("--kv-cache", "paged", "--swa-full")
    standard_full = kv_buffer_mib("--swa-full")
    assert paged <= 1.02 * standard, f"paged {paged} MiB against upstream's {standard} MiB"
    assert standard_full <= paged_full <= 1.02 * standard_full, f"--swa-full: {paged_full} against {standard_full}"
    assert standard_full > 3 * standard, "the window layers' cache is no longer smaller than a full one"


def test_seq_keep_and_clear_give_pages_back() -> None:
    r = probe("free", str(get_model("smollm2-135m")))
    assert r["full"] and r["one_more_fails"]
    assert r["kept"] == [-1, 31, -1, -1] and r["after_keep"], "seq_keep did not give the other sequences' pages back"
    assert r["cleared"] == [-1, -1, -1, -1] and r["after_clear"], "clear did not give the pages back"
