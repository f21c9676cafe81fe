"""llama-perplexity: parsing real output (plain and --kl-divergence), parameter checks, and the KLD base cache."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness.errors import HarnessError
from pyharness.runners import perplexity as ppl
from pyharness.store import KLD_STAT_COLUMNS


def test_final_estimate_of_a_real_run() -> None:
    out, err = evalkit.fixture("ppl-base.stdout"), evalkit.fixture("ppl-base.stderr")
    # the line is interleaved with the ETA message in the real log: take the numbers straight from the text
    raw = re.search(r"Final estimate: PPL = (\S+) \+/- (\S+)", err)
    assert raw is not None
    row, kld = ppl.parse_perplexity_output(out, err, kld=False)
    assert kld is None
    assert row == {
        "ppl": float(raw.group(1)),
        "ppl_err": float(raw.group(2)),
        "source": "final_estimate",
        "kv_mib": None,  # the fixture ran without -lv 4
        "kv_used_mib": None,  # and with the standard cache
    }
    assert row["ppl"] == 33.1128 and row["ppl_err"] == 7.47930


def test_kl_divergence_statistics_of_a_real_run() -> None:
    out, err = evalkit.fixture("kld-q8_0.stdout"), evalkit.fixture("kld-q8_0.stderr")
    row, kld = ppl.parse_perplexity_output(out, err, kld=True)
    assert kld is not None
    assert row == {
        "ppl": 33.04877,
        "ppl_err": 7.459192,
        "source": "kld_statistics",
        "kv_mib": None,
        "kv_used_mib": None,
    }
    assert set(kld) == set(KLD_STAT_COLUMNS)
    expected = {
        "ppl_base": 32.96351,
        "ppl_base_err": 7.4105,
        "cor_ln_ppl_pct": 99.94,
        "ln_ppl_ratio": 0.002583,
        "ppl_ratio": 1.002587,
        "ppl_ratio_err": 0.007757,
        "ppl_diff": 0.08526,
        "kld_mean": 0.004411,
        "kld_mean_err": 0.000317,
        "kld_max": 0.049084,
        "kld_p99_9": 0.043068,
        "kld_p99": 0.020277,
        "kld_p95": 0.012964,
        "kld_p90": 0.009469,
        "kld_median": 0.003020,
        "kld_p10": 0.000170,
        "kld_p5": 0.000028,
        "kld_p1": 0.000001,
        "kld_p0_1": 0.0,
        "kld_min": 0.0,
        "dp_mean_pct": -0.108,
        "dp_mean_err_pct": 0.092,
        "dp_max_pct": 6.884,
        "dp_p75_pct": 0.119,
        "dp_p25_pct": -0.167,
        "dp_p0_1_pct": -7.588,
        "dp_min_pct": -7.614,
        "dp_rms_pct": 1.457,
        "dp_rms_err_pct": 0.156,
        "same_top_pct": 95.635,
        "same_top_err_pct": 1.290,
    }
    for name, value in expected.items():
        assert kld[name] == pytest.approx(value, abs=1e-9), name


def test_every_printed_statistic_is_parsed() -> None:
    """Each number line of the three statistics blocks maps to a stored value (catches a format change)."""
    out = evalkit.fixture("kld-q8_0.stdout")
    block = out[out.index("====== Perplexity statistics") :]
    stat_lines = [ln for ln in block.splitlines() if ":" in ln and not ln.startswith("=")]
    _, kld = ppl.parse_perplexity_output(out, "", kld=True)
    assert kld is not None
    # +2: Mean PPL(Q) goes to the perplexity row (ppl, ppl_err); every other line yields one or two columns
    two_valued = sum("±" in ln for ln in stat_lines)
    assert len(kld) + 2 == len(stat_lines) + two_valued


def test_kld_without_statistics_block_is_an_error() -> None:
    out = evalkit.fixture("kld-q8_0.stdout")
    short = out[: out.index("====== Perplexity statistics")]  # what llama-perplexity prints for < 100 tokens
    with pytest.raises(ppl.ParseError, match="100 or more"):
        ppl.parse_perplexity_output(short, evalkit.fixture("kld-q8_0.stderr"), kld=True)


def test_plain_run_without_final_estimate_is_an_error() -> None:
    err = "0.00.1 E perplexity: you need at least 256 tokens to evaluate perplexity with a context of 128\n"
    with pytest.raises(ppl.ParseError, match="you need at least 256 tokens"):
        ppl.parse_perplexity_output("", err, kld=False)


def test_failed_exit_and_silent_failure_are_failed_records() -> None:
    ctx = evalkit.fake_context(evalkit.fake_build())
    params = ppl.PplParams(ctx=128, chunks=4).validate()
    fields = evalkit.base_fields(ctx, "ppl", "h", {**params.as_dict(), "kld": None})
    crashed = ppl.perplexity_record(
        fields, evalkit.execution("", "error: unknown argument: --bogus\n", 1), params, None
    )
    assert crashed.fields["status"] == "failed" and "--bogus" in crashed.fields["error"]
    assert crashed.perplexity is None
    # exit 0 but no numbers (llama-perplexity returns 0 when the text is too short)
    silent = ppl.perplexity_record(
        fields, evalkit.execution("", "perplexity: tokenizing the input ..\n", 0), params, None
    )
    assert silent.fields["status"] == "failed" and "Final estimate" in silent.fields["error"]


def test_kv_cache_size_is_llama_cpps_own_summed_over_its_caches() -> None:
    one = (
        "0.00.213.068 I llama_kv_cache: size =   46.41 MiB (   256 cells,  30 layers, 16/16 seqs), "
        "K (q8_kv):   23.20 MiB, V (q8_kv):   23.20 MiB\n"
    )
    assert ppl.parse_kv_mib("noise\n" + one + "more noise\n") == 46.41
    iswa = (
        "I llama_kv_cache_iswa: creating non-SWA KV cache, size = 256 cells\n"
        "I llama_kv_cache:        CPU KV buffer size =     6.19 MiB\n"
        "I llama_kv_cache: size =    6.19 MiB (   256 cells,   3 layers, 16/16 seqs), "
        "K (q8_kv): 3.09 MiB, V (q8_kv): 3.09 MiB\n"
        "I llama_kv_cache_iswa: creating     SWA KV cache, size = 256 cells\n"
        "I llama_kv_cache: size =   30.94 MiB (   256 cells,  15 layers, 16/16 seqs), "
        "K (q8_kv): 15.47 MiB, V (q8_kv): 15.47 MiB\n"
    )
    assert ppl.parse_kv_mib(iswa) == 6.19 + 30.94  # the buffer-size lines are not counted twice
    paged = (
        "I llama_kv_cache_paged:        CPU KV buffer size =    45.70 MiB\n"
        "I llama_kv_cache_paged: size =   45.70 MiB (    96 pages of 64 slots,  30 layers,  4 seqs), "
        "K (f16):   22.50 MiB, V (f16):   22.50 MiB, positions: 0.70 MiB (1.56% of K+V)\n"
    )
    assert ppl.parse_kv_mib(paged) == 45.70
    assert ppl.parse_kv_mib("llama_kv_cache:        CPU KV buffer size =     6.19 MiB\n") is None


def test_kv_memory_in_use_is_the_paged_caches_last_line() -> None:
    """The paged cache logs its pages in use with the memory breakdown; the last such line is the run's end state."""
    log = (
        "I llama_kv_cache_paged: size =   45.70 MiB (    96 pages of 64 slots,  30 layers,  4 seqs), "
        "K (f16):   22.50 MiB, V (f16):   22.50 MiB, positions: 0.70 MiB (1.56% of K+V)\n"
        "I memory_breakdown: paged KV cache: 0 of 2880 pages in use (0.00 of 45.70 MiB, 30 layers, pages of 64 "
        "slots)\n"
        "I memory_breakdown: paged KV cache: 720 of 2880 pages in use (11.42 of 45.70 MiB, 30 layers, pages of 64 "
        "slots)\n"
    )
    assert ppl.parse_kv_used_mib(log) == 11.42
    assert ppl.parse_kv_mib(log) == 45.70
    row, _ = ppl.parse_perplexity_output("", log + "Final estimate: PPL = 12.5 +/- 0.5\n", kld=False)
    assert (row["kv_mib"], row["kv_used_mib"]) == (45.70, 11.42)
    assert ppl.parse_kv_used_mib("I llama_kv_cache: size =   46.41 MiB (   256 cells,  30 layers, 16/16 seqs)") is None


def test_kv_memory_in_use_counts_the_observed_queries_of_kv_compress() -> None:
    """KV-Compress's rings of observed queries are memory the compression costs: they count with the pages."""
    log = (
        "I memory_breakdown: paged KV cache: 720 of 2880 pages in use (11.42 of 45.70 MiB, 30 layers, pages of 64 "
        "slots)\n"
        "I memory_breakdown: paged KV cache: observed queries 8.44 MiB (512 per sequence)\n"
    )
    assert ppl.parse_kv_used_mib(log) == 11.42 + 8.44


def test_parameters_are_checked() -> None:
    with pytest.raises(HarnessError, match="needs flash attention"):
        ppl.PplParams(cache_type_v="q8_0", flash_attn="off").validate()
    with pytest.raises(HarnessError, match="unknown K cache type"):
        ppl.PplParams(cache_type_k="q3_k").validate()
    with pytest.raises(HarnessError, match="not on, off, auto or int8"):
        ppl.PplParams(flash_attn="maybe").validate()
    p = ppl.PplParams(
        ctx=256, chunks=2, threads=2, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="1", extra=("--foo", "1")
    ).validate()
    assert p.flash_attn == "on"
    assert p.args() == [
        "-c",
        "256",
        "--chunks",
        "2",
        "-ctk",
        "q8_0",
        "-ctv",
        "q8_0",
        "-fa",
        "on",
        "-t",
        "2",
        "-lv",
        "4",
        "--foo",
        "1",
    ]
    assert "threads" not in p.identity()


@pytest.fixture(scope="module")
def model_path() -> Path:
    return evalkit.real_model()


@pytest.mark.slow
def test_kld_base_is_computed_once_and_reused(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real base run of the upstream build, then a second request served from the cache without running."""
    monkeypatch.setenv("PYHARNESS_CACHE", str(tmp_path / "cache"))
    from pyharness.runners import resolve_model

    model = resolve_model(str(model_path))
    text = evalkit.real_text()
    run = ppl.PplParams(ctx=128, chunks=4, threads=2, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on")
    first = ppl.base_logits(model, text, "cpu", run.validate(), ppl.KldBase())
    assert first.path.is_file() and first.meta["size"] == first.path.stat().st_size
    assert first.meta["params"]["cache_type_k"] == "f16" and first.meta["variant"] == "upstream"
    assert first.meta["ppl"] > 1

    def no_runs(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached base was recomputed")

    monkeypatch.setattr(ppl, "execute", no_runs)
    again = ppl.base_logits(model, text, "cpu", run.validate(), ppl.KldBase())
    assert again.key == first.key and again.meta == first.meta
    # the key is a function of what the logits depend on: same inputs, same key; another context, another key
    from dataclasses import replace

    from pyharness.text import cached_sha256

    base_params = ppl.KldBase().params_for(run.validate())
    text_sha = cached_sha256(text)
    upstream = evalkit.real_build("upstream")
    assert ppl.kld_base_key(model, text_sha, upstream, base_params) == first.key
    assert ppl.kld_base_key(model, text_sha, upstream, replace(base_params, ctx=256)) != first.key
    assert ppl.kld_base_key(model, text_sha, upstream, replace(base_params, cache_type_k="q8_0")) != first.key
    assert json.loads((first.path.parent / "meta.json").read_text())["key"] == first.key


def test_missing_text_says_how_to_supply_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyharness import text

    monkeypatch.delenv("PYHARNESS_TEXT", raising=False)
    monkeypatch.setenv("PYHARNESS_CACHE", str(tmp_path))
    monkeypatch.setattr(text, "shared_text", lambda: None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails as if not installed
    with pytest.raises(HarnessError) as info:
        text.resolve_text(None)
    assert "datasets" in info.value.problem and "--text FILE" in info.value.fix and "PYHARNESS_TEXT" in info.value.fix
    with pytest.raises(HarnessError, match="does not exist"):
        text.resolve_text(tmp_path / "nope.raw")
    given = tmp_path / "mine.raw"
    given.write_text("hello")
    assert text.resolve_text(given) == given.resolve()
    monkeypatch.setenv("PYHARNESS_TEXT", str(given))
    assert text.resolve_text(None) == given.resolve()


def test_kld_base_of_int8_attention_runs_plain_flash_attention() -> None:
    run = ppl.PplParams(cache_type_k="q8_kv", cache_type_v="q8_kv", flash_attn="int8").validate()
    base = ppl.KldBase().params_for(run)
    assert (base.cache_type_k, base.cache_type_v, base.flash_attn) == ("f16", "f16", "on")
    assert ppl.KldBase(flash_attn="off").params_for(run).flash_attn == "off"
