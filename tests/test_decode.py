"""The decode runner: timings parsed from real llama-completion output, commands per sampler setup."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyharness.runners.decode import SETUPS, DecodeParams, parse_timings

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_timings_of_a_real_run() -> None:
    text = (FIXTURES / "completion-greedy.stderr").read_text()
    eval_ms, runs, sampling_ms = parse_timings(text)
    # read the same lines independently: "... eval time =  X ms /  N runs ..." and "sampling time =  Y ms"
    lines = [ln for ln in text.splitlines() if "common_perf_print:" in ln]
    ev = next(ln for ln in lines if ln.split("common_perf_print:")[1].strip().startswith("eval time"))
    sa = next(ln for ln in lines if "sampling time" in ln)
    assert eval_ms == float(ev.split("=")[1].split("ms")[0])
    assert runs == int(ev.split("/")[1].split("runs")[0])
    assert sampling_ms == float(sa.split("=")[1].split("ms")[0])
    assert runs == 7  # -n 8: the first token comes from the prompt evaluation


def test_missing_timings_are_an_error() -> None:
    with pytest.raises(ValueError, match="no eval/sampling timings"):
        parse_timings("llama-completion: error: something went wrong\n")


def test_commands_per_setup() -> None:
    p = DecodeParams(n_gen=16, threads=4, n_gpu_layers=99)
    greedy = p.command("llama-completion", "m.gguf", "greedy")
    assert greedy[greedy.index("--temp") + 1] == "0" and "-bs" not in greedy
    sf = p.command("llama-completion", "m.gguf", "sortfree-bs")
    assert sf[sf.index("--sampler-kernel") + 1] == "sortfree" and "-bs" in sf
    assert sf[sf.index("-ngl") + 1] == "99" and sf[sf.index("-t") + 1] == "4" and sf[sf.index("-n") + 1] == "16"
    chain = p.command("llama-completion", "m.gguf", "chain")
    assert chain[chain.index("--top-k") + 1] == "40" and "--sampler-kernel" not in chain
    assert set(SETUPS) == {"greedy", "chain", "chain-bs", "sortfree", "sortfree-bs"}


def test_execution_failure_says_how() -> None:
    from pyharness.runners import Execution

    def exe(code: int, timed_out: bool = False) -> Execution:
        return Execution(["t"], code, "", "note\nerror: no such file\n", "a", "b", 12.3, timed_out)

    assert exe(0).failure("tool") is None
    assert exe(1).failure("tool") == "tool exited 1: error: no such file"
    assert exe(-9, timed_out=True).failure("tool") == "tool timed out after 12 s"
