"""The paged-cache evaluations of the harness (`paged-generate`, `paged-server` in a matrix): the comparisons and
verdicts on made-up answers, the matrix checks, the report rendered from stored runs, the build flags llama-server
needs; and, on the patched CPU build with SmolLM2 (which CI builds and fetches), a small matrix of both kinds run
end to end into a store and rendered."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness import matrix
from pyharness.build import COMMON_FLAGS, cmake_flags
from pyharness.errors import HarnessError
from pyharness.paged_generation import GenerationConfig, first_difference, paged_cache_used
from pyharness.paged_report import excerpt, server_verdict
from pyharness.paged_server import (
    Answer,
    ServerConfig,
    Trial,
    assign_batches,
    kv_lines,
    log_problems,
    prompt_batches,
    run_trials,
    summarize,
    trials_as_dicts,
    trials_from_dicts,
)
from pyharness.report import build_report
from pyharness.runners import run_fields
from pyharness.runners.paged import generation_evals, generation_problem
from pyharness.store import RunRecord, Store

# ------------------------------------------------------------------------------------------------ comparisons


def test_first_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([7], [8]) == 0
    assert first_difference([1, 2], [1, 2, 3]) == 2  # a prefix differs where the shorter one ends
    assert first_difference([], []) is None


def test_generation_config_rejects_what_would_not_run() -> None:
    GenerationConfig().validate()
    with pytest.raises(ValueError, match="n_gen"):
        GenerationConfig(n_gen=0).validate()
    with pytest.raises(ValueError, match="flash_attn"):
        GenerationConfig(flash_attn="int8").validate()
    with pytest.raises(ValueError, match="prompts"):
        GenerationConfig(prompts=[]).validate()


def test_paged_cache_used_needs_its_size_line_and_no_fallback() -> None:
    size = "llama_kv_cache_paged: size =   45.70 MiB (96 pages of 64 slots, 30 layers, 4 seqs)"
    fallback = "llama_model: paged KV cache not used (architecture x): using the standard KV cache"
    assert paged_cache_used([size])
    assert not paged_cache_used(["llama_kv_cache: size =   45.00 MiB (2048 cells, 30 layers, 4/1 seqs)"])
    assert not paged_cache_used([size, fallback])


def answer(prompt: int, tokens: list[int], batch: int = -1) -> Answer:
    text = "".join(chr(97 + t % 26) for t in tokens)
    return Answer(prompt, True, 200, content=text, tokens=tokens, id_slot=prompt, batch=batch)


def trial(
    cache: str, mode: str, repeat: int, answers: list[list[int] | None], batches: list[int] | None = None
) -> Trial:
    """A trial with these answers (None: no answer); batches: the batch each prompt began in (default: prompt i in
    batch i, as when requests go one after another)."""
    batches = batches or list(range(len(answers)))
    made = [
        answer(i, t, batches[i]) if t is not None else Answer(i, False, 0, error="no response")
        for i, t in enumerate(answers)
    ]
    return Trial(cache, mode, repeat, ["llama-server"], made, [], cache == "paged")


def test_summary_tells_batch_composition_from_a_cache_difference() -> None:
    a, b, c = [1, 2, 3], [4, 5, 6], [4, 5, 9]
    together, apart = [0, 0], [0, 1]  # concurrent: both prompts in the first batch, or the second one a step later
    trials = [
        # the standard cache changes its own answer to prompt 1 with the batches its prompts began in
        trial("standard", "concurrent", 0, [a, b], apart),
        trial("standard", "concurrent", 1, [a, c], together),
        trial("standard", "sequential", 0, [a, b]),
        trial("standard", "sequential", 1, [a, b]),
        trial("paged", "concurrent", 0, [a, c], together),
        trial("paged", "concurrent", 1, [a, c], together),
        trial("paged", "sequential", 0, [a, b]),
        trial("paged", "sequential", 1, [a, b]),
    ]
    s = summarize(trials)
    assert s["answered"]["standard concurrent"] == [4, 4]
    assert s["deterministic"] == {
        "standard concurrent": False,
        "standard sequential": True,
        "paged concurrent": True,
        "paged sequential": True,
    }
    assert s["batches"]["standard concurrent"] == ["[0][1]", "[0 1]"]
    assert s["across_caches"] == {"concurrent": [None, 2], "sequential": [None, None]}
    # same batches: standard #1 with both paged concurrent trials; each sequential trial with each other
    assert [p for p in s["same_batches"] if p[0] == "concurrent"] == [
        ["concurrent", 1, 0, "[0 1]", True],
        ["concurrent", 1, 1, "[0 1]", True],
    ]
    assert len([p for p in s["same_batches"] if p[0] == "sequential"]) == 4
    verdict = server_verdict(s)
    assert "batch composition, not with the cache" in verdict and "the standard cache also changed" in verdict
    # the same answers on different batches, but a difference on the same batches, is the cache's
    trials[1] = trial("standard", "concurrent", 1, [a, b], together)
    verdict = server_verdict(summarize(trials))
    assert verdict.startswith("A cache difference: concurrent trial 2 of the standard cache and trial 1")
    # and so is a difference with requests sent one after another
    trials[1] = trial("standard", "concurrent", 1, [a, c], together)
    trials[6] = trial("paged", "sequential", 0, [a, c])
    assert "A cache difference: sequential" in server_verdict(summarize(trials))


def test_prompt_batches_from_the_server_debug_log() -> None:
    log = """\
0.01.437.924 I slot launch_slot_: id  3 | task 0 | processing task, is_child = 0
0.01.438.037 I slot   operator(): id  1 | task 2 | new prompt, n_ctx_slot = 512, n_keep = 0, task.n_tokens = 11
0.01.438.055 I slot   operator(): id  2 | task 1 | new prompt, n_ctx_slot = 512, n_keep = 0, task.n_tokens = 5
0.01.438.075 D srv        decode: n_batch (effective) = 2048, off = 0
0.01.538.075 D srv        decode: n_batch (effective) = 1024, off = 1024
0.01.631.811 I slot   operator(): id  0 | task 4 | new prompt, n_ctx_slot = 512, n_keep = 0, task.n_tokens = 7
0.01.638.075 D srv        decode: n_batch (effective) = 2048, off = 0
0.01.731.811 I slot   operator(): id  1 | task 5 | new prompt, n_ctx_slot = 512, n_keep = 0, task.n_tokens = 7
"""
    batches = prompt_batches(log)
    assert batches == [(1, 0), (2, 0), (0, 1), (1, 2)]
    answers = [answer(0, [1]), answer(1, [1]), answer(2, [1])]
    answers[0].id_slot, answers[1].id_slot, answers[2].id_slot = 2, 0, 1
    answers[2].sent_s = 1.0  # sent after the others: slot 1's second prompt
    answers.append(Answer(3, True, 200, tokens=[1], id_slot=1, sent_s=0.5))
    assign_batches(answers, batches)
    assert [a.batch for a in answers] == [0, 1, 2, 0]
    t = Trial("paged", "concurrent", 0, ["x"], answers, [], True)
    assert t.composition() == "[0 3][1][2]"


def test_summary_with_missing_answers_compares_nothing_it_cannot() -> None:
    trials = [
        trial("standard", "concurrent", 0, [[1], [2]]),
        trial("standard", "concurrent", 1, [[1], [2]]),
        trial("paged", "concurrent", 0, [[1], None]),
        trial("paged", "concurrent", 1, [[1], [2]]),
    ]
    s = summarize(trials)
    assert s["answered"] == {"standard concurrent": [4, 4], "paged concurrent": [3, 4]}
    assert s["deterministic"] == {"standard concurrent": True, "paged concurrent": None}
    assert s["across_caches"] == {"concurrent": None}
    assert server_verdict(s) == (
        "The caches could not be compared: the standard cache answered 4 of 4 requests, the paged cache answered "
        "3 of 4 requests."
    )
    assert trials_from_dicts(json.loads(json.dumps(trials_as_dicts(trials)))) == trials


SERVER_LOG = """\
0.00.199.805 I llama_kv_cache_paged: size =   45.70 MiB (    96 pages of 64 slots,  30 layers,  4 seqs)
0.00.201.000 W srv  llama_server: security: no API key is set and CORS allows all origins
0.06.001.352 E state_seq_get_size: error getting state size: paged KV cache: state save/load is not supported yet
0.07.001.352 E state_seq_get_size: error getting state size: paged KV cache: state save/load is not supported yet
0.08.000.000 I slot release: id  3 | task 0 | stop processing
"""


def test_server_log_lines() -> None:
    assert kv_lines(SERVER_LOG) == [
        "llama_kv_cache_paged: size =   45.70 MiB (    96 pages of 64 slots,  30 layers,  4 seqs)"
    ]
    assert log_problems(SERVER_LOG) == [
        "E state_seq_get_size: error getting state size: paged KV cache: state save/load is not supported yet"
    ]


def test_a_server_that_does_not_start_is_a_trial_without_answers(tmp_path: Path) -> None:
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'E main: cannot load the model' >&2\nexit 3\n")
    fake.chmod(0o755)
    config = ServerConfig(prompts=["a", "b"], startup_timeout_s=20)
    trials = run_trials(fake, tmp_path / "none.gguf", config, modes=["sequential"], repeats=1)
    assert [(t.cache, t.answered, len(t.answers)) for t in trials] == [("standard", 0, 2), ("paged", 0, 2)]
    assert "exited 3" in trials[0].error and "cannot load the model" in trials[0].log_tail
    with pytest.raises(HarnessError, match="does not exist"):
        run_trials(tmp_path / "missing", tmp_path / "none.gguf", config)
    with pytest.raises(HarnessError, match="unknown request mode"):
        run_trials(fake, tmp_path / "none.gguf", config, modes=["burst"])


# ------------------------------------------------------------------------------------------------ build, matrix


def test_llama_server_target_turns_the_server_on_without_downloading_a_ui() -> None:
    plain = cmake_flags("cpu", "90", [])
    assert "-DLLAMA_BUILD_SERVER=OFF" in plain and "-DLLAMA_BUILD_SERVER=ON" not in plain
    flags = cmake_flags("cpu", "90", [], ["llama", "llama-server"])
    assert "-DLLAMA_BUILD_SERVER=ON" in flags and "-DLLAMA_BUILD_SERVER=OFF" not in flags
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in flags
    assert sum(f.startswith("-DLLAMA_BUILD_SERVER=") for f in flags) == 1
    assert len([f for f in flags if f in COMMON_FLAGS]) == len(COMMON_FLAGS) - 1


PAGED = """\
[matrix]
name = "p"
variants = ["patched"]
backends = ["cpu"]
models = ["{model}"]

[flags]
kv = "f16"
flash_attn = "on"
threads = 2

[[eval]]
kind = "paged-generate"
n_gen = {n_gen}

[[eval]]
kind = "paged-server"
n_predict = {n_predict}
repeats = 2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


def test_matrix_expands_the_paged_kinds(tmp_path: Path) -> None:
    spec = matrix.load_matrix(write(tmp_path, PAGED.format(model="smollm2-135m", n_gen=256, n_predict=128)))
    cells = spec.cells()
    assert [c.ev.kind for c in cells] == ["paged-generate", "paged-server"]
    gen = matrix.paged_generate_params(cells[0])
    assert (gen.n_gen, gen.threads, gen.flash_attn, len(gen.prompts)) == (256, 2, "on", 4)
    server = matrix.paged_server_params(cells[1])
    assert (server.parallel, server.n_predict, server.repeats, server.modes) == (
        4,
        128,
        2,
        ["concurrent", "sequential"],
    )
    assert server.extra == [] and "server_args" not in cells[1].ev.values  # the configuration hash stays as it was
    text = PAGED.format(model="smollm2-135m", n_gen=256, n_predict=128).replace("repeats = 2", 'server_args = ["-kvu"]')
    text = text.replace("threads = 2", 'threads = 2\nextra = ["-ub", "64"]')
    text = text.replace('[[eval]]\nkind = "paged-generate"\nn_gen = 256\n\n', "")
    server = matrix.paged_server_params(matrix.load_matrix(write(tmp_path, text)).cells()[0])
    assert server.extra == ["-ub", "64", "-kvu"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('variants = ["patched"]', 'variants = ["upstream", "patched"]'), "needs the patched variant"),
        (('kv = "f16"', 'kv = "q8_0"'), "runs f16 caches"),
        (("threads = 2", 'threads = 2\nextra = ["-kvu"]'), "takes no tool arguments"),
        (("repeats = 2", 'repeats = 2\nmodes = ["burst"]'), "modes must be a list of"),
        (("repeats = 2", "repeats = 2\nparallel = 2"), "fewer requests at once than the 4 prompts"),
        (("n_gen = 256", "n_gen = 0"), "'n_gen' must be an integer >= 1"),
        (("repeats = 2", 'server_args = "-kvu"'), "server_args must be a list"),
    ],
)
def test_matrix_refuses_paged_cells_that_cannot_compare(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    text = PAGED.format(model="smollm2-135m", n_gen=256, n_predict=128).replace(*edit)
    with pytest.raises(HarnessError, match=message):
        matrix.load_matrix(write(tmp_path, text))


def test_shipped_generation_matrix_is_valid() -> None:
    spec = matrix.load_matrix(Path(__file__).resolve().parent.parent / "matrices" / "paged-kv-cpu-generation.toml")
    assert {(c.model, c.ev.kind) for c in spec.cells()} == {
        (m, k) for m in ("smollm2-135m", "gemma3-270m") for k in ("paged-generate", "paged-server")
    }


# ------------------------------------------------------------------------------------------------ report


def generation_result(paged_tokens: list[int], library: str = "/b/bin/libllama.so.0") -> dict[str, Any]:
    std = [5, 6, 7, 8]
    first = first_difference(std, paged_tokens)
    return {
        "config": {**GenerationConfig(prompts=["Once | upon"], n_gen=4).__dict__},
        "sequences": [
            {
                "seq": 0,
                "prompt": "Once | upon",
                "prompt_tokens": 3,
                "tokens": {"standard": std, "paged": paged_tokens},
                "text": {"standard": "a time\nthere", "paged": "a time\nwhere"},
                "first_token_difference": first,
                "first_logits_difference": None if first is None else 1,
                "max_abs_logit_diff": 0.0 if first is None else 0.25,
                "rows_compared": 4 if first is None else first + 1,
            }
        ],
        "paged_active": True,
        "logs": {"standard": ["llama_kv_cache: size = 1 MiB"], "paged": ["llama_kv_cache_paged: size = 1 MiB"]},
        "failed": {},
        "library": library,
        "identical": int(first is None),
    }


def test_generation_problems_and_evals() -> None:
    good = generation_result([5, 6, 7, 8])
    assert generation_problem(good, Path("/b/bin")) is None
    assert "not the build's" in str(generation_problem(good, Path("/other/bin")))
    assert "did not use the paged cache" in str(generation_problem({**good, "paged_active": False}, Path("/b/bin")))
    assert "stopped early" in str(generation_problem({**good, "failed": {"paged": "rc 1"}}, Path("/b/bin")))
    evals = {e.metric: e.value for e in generation_evals(generation_result([5, 6, 9, 8]))}
    assert evals == {"generate seq0 same tokens": 2, "generate identical sequences": 0}


def test_report_renders_the_stored_comparisons(tmp_path: Path) -> None:
    ctx = evalkit.fake_context(evalkit.fake_build("patched", series="abc"), matrix="paged")
    a, b = [1, 2, 3], [4, 5, 6]
    odd = ("paged", "concurrent", 0)  # both prompts in the first batch, where the other trials had them apart
    trials = [
        trial(cache, mode, r, [a, [4, 7, 6]], [0, 0]) if (cache, mode, r) == odd else trial(cache, mode, r, [a, b])
        for cache in ("standard", "paged")
        for mode in ("concurrent", "sequential")
        for r in range(2)
    ]
    with Store(tmp_path / "r.sqlite") as store:
        for paged, kind in (([5, 6, 9, 8], "paged-generate"), (None, "paged-server")):
            fields = run_fields(kind, ctx, {"prompts": ["p0", "p1"], "n_predict": 3, "repeats": 2})
            stdout = (
                json.dumps(generation_result(paged))
                if paged
                else json.dumps({"summary": summarize(trials), "trials": trials_as_dicts(trials)})
            )
            fields.update(evalkit.execution(stdout).fields(), status="ok", error=None)
            store.record(RunRecord(fields=fields))
        md = build_report(store, matrix="paged").markdown
    gen = md[md.index("Greedy generation") : md.index("llama-server, standard vs paged")]
    row = next(ln for ln in gen.splitlines() if ln.startswith("| 0 |"))
    assert "| 2 |" in row and "standard: a time⏎there<br>paged: a time⏎where" in row and "Once \\| upon" in row
    assert "differ from token 1 (max abs 0.25)" in row
    server = md[md.index("llama-server, standard vs paged") :]
    assert "| paged | concurrent | 4 of 4 | **no** | yes | [0 1] (slots 0/1), [0][1] (slots 0/1) | none |" in server
    assert "| 1 | p1 | token 1 | identical | 3 |" in server
    assert "batch composition, not with the cache" in server and "paged cache also changed" in server
    assert "the 6 standard/paged pair(s) of trials whose prompts began in the same batches answered alike" in server


def test_excerpt_is_one_table_cell() -> None:
    assert excerpt("a|b\nc`d") == "a\\|b⏎c'd"
    assert excerpt("x" * 200, 10) == "x" * 10 + "…"


# ------------------------------------------------------------------------------------------------ real runs


@pytest.mark.slow
def test_small_matrix_on_the_patched_build_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both kinds on SmolLM2 with few tokens (tens of seconds): stored, compared and rendered. The caches must agree
    token for token here (the paged cache gives the standard cache's logits bit for bit on the CPU)."""
    model = evalkit.real_model()
    monkeypatch.setenv("PYHARNESS_CACHE", str(tmp_path / "cache"))
    spec = matrix.load_matrix(write(tmp_path, PAGED.format(model=model, n_gen=24, n_predict=12)))
    with Store(tmp_path / "r.sqlite") as store:
        result = matrix.run_matrix(
            spec, store, builder=matrix.default_builder(no_build=True, root=None), progress=False
        )
        assert (result.ran, result.ok, result.failed) == (2, 2, [])
        runs = {r["kind"]: r for r in store.runs(matrix="p", status="ok")}
        gen = json.loads(runs["paged-generate"]["stdout"].strip().splitlines()[-1])
        assert gen["paged_active"] and gen["identical"] == 4
        assert all(s["first_logits_difference"] is None and s["rows_compared"] == 24 for s in gen["sequences"])
        assert all(len(s["tokens"]["paged"]) == 24 and s["text"]["paged"] for s in gen["sequences"])
        server = json.loads(runs["paged-server"]["stdout"])
        assert all(ok == sent == 8 for ok, sent in server["summary"]["answered"].values())
        summary = server["summary"]
        # alone in their batches, and wherever the prompts began in the same batches, the caches agree; requests sent
        # together may begin in other batches from trial to trial (timing), which may change answers by itself
        assert summary["across_caches"]["sequential"] == [None] * 4
        assert summary["same_batches"] and all(pair[4] for pair in summary["same_batches"])
        if summary["across_caches"]["concurrent"] != [None] * 4:
            assert summary["batches"]["standard concurrent"][0] != summary["batches"]["paged concurrent"][0]
        assert all(t["paged_active"] for t in server["trials"] if t["cache"] == "paged")
        assert all(len(a["tokens"]) == 12 for t in server["trials"] for a in t["answers"])
        md = build_report(store, matrix="p").markdown
    assert "4 of 4 sequences identical" in md and "| paged | sequential | 8 of 8 | yes | yes | [0][1][2][3]" in md
