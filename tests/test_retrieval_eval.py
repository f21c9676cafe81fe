"""llama-needle runs (`kind = "retrieval"`): the command the runner builds, the lines it checks and stores, the
report's accuracies and ratios, the matrix checks and the shipped matrices. The tool is a fake (a Python script in a
temporary build's bin/) that answers from its arguments by fixed rules, so every expected number below is computed
from those rules, not from the code under test."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness import matrix, paths
from pyharness.errors import HarnessError
from pyharness.report import build_report, write_report
from pyharness.runners import ModelRef, RunContext
from pyharness.runners.bench import ParseError
from pyharness.runners.retrieval import LINE_TYPES, SEED, RetrievalParams, parse_lines, run_retrieval
from pyharness.store import RETRIEVAL_COLUMNS, Store

# The fake tool. Its rules (which the expectations below restate independently):
#   full:      wrong only at trial 0 for depths below 0.5
#   kvc:       wrong only at trial 3
#   uniform:   wrong for depths below 0.5
#   streaming: wrong at odd trials when the rate is 4 or more
#   kv_bytes_full = length // 16; kv_bytes = round(kv_bytes_full / rate) + trial; t_compress_ms = 1 + trial (0 for full)
# $FAKE_RETRIEVAL_MODE: ok | malformed (line 3's "correct" is a string) | garbage (a non-JSON line) | exit (2 lines,
# then an error and exit 1) | short (the last line left out); it writes its arguments to $FAKE_RETRIEVAL_ARGS.
FAKE = """\
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_RETRIEVAL_ARGS"], "w") as fh:
    json.dump(args, fh)
def opt(name):
    return args[args.index(name) + 1]
lengths = [int(x) for x in opt("--needle-lengths").split(",")]
depths = [float(x) for x in opt("--needle-depths").split(",")]
trials = int(opt("--needle-trials"))
keys = int(opt("--needle-keys"))
methods = opt("--needle-methods").split(",")
rates = [float(x) for x in opt("--needle-rates").split(",")]
configs = ([("full", 1.0)] if "full" in methods else []) + [(m, r) for m in methods if m != "full" for r in rates]
mode = os.environ.get("FAKE_RETRIEVAL_MODE", "ok")
lines = []
for length in lengths:
    for depth in depths:
        for trial in range(trials):
            print(f"trial {trial} of {trials} at length {length}, depth {depth}", file=sys.stderr)
            for method, rate in configs:
                wrong = {
                    "full": trial == 0 and depth < 0.5,
                    "kvc": trial == 3,
                    "uniform": depth < 0.5,
                    "streaming": trial % 2 == 1 and rate >= 4,
                }[method]
                full = length // 16
                pages = full if method == "full" else round(full / rate) + trial
                lines.append({
                    "length": length, "depth": depth, "trial": trial, "keys": keys, "method": method,
                    "rate": rate, "budget": int(length / rate), "expected": "48213",
                    "output": "11111" if wrong else "48213.", "correct": not wrong, "n_prompt": length,
                    "kv_bytes": pages, "kv_bytes_full": full, "kv_ratio": round(pages / full, 4),
                    "t_prefill_ms": 800.0 + trial, "t_compress_ms": 0.0 if method == "full" else 1.0 + trial,
                    "t_decode_ms": 40.5,
                })
out = [json.dumps(x) for x in lines]
if mode == "malformed":
    bad = dict(lines[2]); bad["correct"] = "yes"; out[2] = json.dumps(bad)
elif mode == "garbage":
    out.insert(1, "| trial | depth | method |")
elif mode == "short":
    out = out[:-1]
elif mode == "exit":
    print("\\n".join(out[:2]))
    print("error: --needle-rates must be at least 1, got 0.5", file=sys.stderr)
    sys.exit(1)
print("\\n".join(out))
"""

LENGTHS = [256, 512]
DEPTHS = [0.25, 0.75]
TRIALS = 4
RATES = [2.0, 4.0]
N_LINES = len(LENGTHS) * len(DEPTHS) * TRIALS * (1 + 3 * len(RATES))  # 112


def params(**changes: object) -> RetrievalParams:
    base = RetrievalParams(lengths=LENGTHS, depths=DEPTHS, trials=TRIALS, keys=1, rates=RATES, threads=2)
    return replace(base, **changes).validate()  # type: ignore[arg-type]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A patched build with the fake llama-needle, a text and a model file, the cache in tmp_path."""
    monkeypatch.setenv("PYHARNESS_CACHE", str(tmp_path / "cache"))
    build_dir = tmp_path / "build" / "patched-cpu"
    (build_dir / "bin").mkdir(parents=True)
    tool = build_dir / "bin" / "llama-needle"
    tool.write_text(f"#!{sys.executable}\n{FAKE}")
    tool.chmod(0o755)
    text = tmp_path / "wiki.test.raw"
    text.write_text(" = Valkyria Chronicles = \n" * 100)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    args = tmp_path / "args.json"
    monkeypatch.setenv("FAKE_RETRIEVAL_ARGS", str(args))
    return {"build_dir": build_dir, "text": text, "model": model, "args": args}


def context(env: dict[str, Path]) -> RunContext:
    build = replace(
        evalkit.fake_build("patched", series="abc"), build_dir=str(env["build_dir"]), targets=["llama-needle"]
    )
    model = ModelRef(name="smollm2-135m", path=env["model"], sha256="b179c952" * 8, size=4)
    return RunContext(build=build, model=model, host=evalkit.fake_host(), matrix="retrieval", cell="fake cell")


# ------------------------------------------------------------------------------------------------ the run


def test_the_command_carries_the_eval_and_the_flags(env: dict[str, Path]) -> None:
    p = params(ubatch=256, n_gpu_layers=0, flash_attn="on", extra=["--kv-compress-window", "16"])
    record = run_retrieval(context(env), p, env["text"])
    assert record.fields["status"] == "ok", record.fields["error"]
    argv = json.loads(env["args"].read_text())
    assert argv == [
        "-m",
        str(env["model"]),
        "-f",
        str(env["text"]),
        "-c",
        str(2 * 512 + 256),
        "--needle-lengths",
        "256,512",
        "--needle-depths",
        "0.25,0.75",
        "--needle-trials",
        "4",
        "--needle-keys",
        "1",
        "--needle-methods",
        "full,kvc,uniform,streaming",
        "--needle-rates",
        "2,4",
        "--seed",
        str(SEED),
        "-ctk",
        "f16",
        "-ctv",
        "f16",
        "-fa",
        "on",
        "-t",
        "2",
        "-ub",
        "256",
        "-ngl",
        "0",
        "--kv-compress-window",
        "16",
    ]
    assert record.fields["command"][0] == str(env["build_dir"] / "bin" / "llama-needle")
    assert record.fields["text_path"] == str(env["text"]) and len(record.fields["text_sha256"]) == 64
    assert record.fields["params"]["ctx"] == 1280 and record.fields["params"]["rates"] == [2.0, 4.0]
    # fractional rates and depths go through unrounded
    assert "2.5,8" in params(rates=[2.5, 8]).args() and "0.125" in params(depths=[0.125]).args()


def test_every_line_is_stored(env: dict[str, Path], tmp_path: Path) -> None:
    record = run_retrieval(context(env), params(), env["text"])
    assert record.ok and len(record.retrieval) == N_LINES
    with Store(tmp_path / "r.sqlite") as store:
        run_id = store.record(record)
        assert store.count("retrieval") == N_LINES
        assert store.columns("retrieval") == ["run_id", *(name for name, _ in RETRIEVAL_COLUMNS)]
        row = store.conn.execute(
            "SELECT * FROM retrieval WHERE run_id = ? AND length = 512 AND depth = 0.25 AND trial = 3 "
            "AND method = 'kvc' AND rate = 4.0",
            (run_id,),
        ).fetchone()
        assert (row["correct"], row["output"], row["expected"], row["budget"]) == (0, "11111", "48213", 128)
        assert (row["kv_bytes_full"], row["kv_bytes"], row["kv_ratio"]) == (32, 8 + 3, round(11 / 32, 4))
        assert (row["t_compress_ms"], row["t_prefill_ms"], row["keys"]) == (4.0, 803.0, 1)
        full = store.conn.execute("SELECT COUNT(*), SUM(correct) FROM retrieval WHERE method = 'full'").fetchone()
        assert tuple(full) == (16, 14)  # trial 0 at depth 0.25 of both lengths is wrong


def test_store_columns_are_the_lines_keys() -> None:
    assert [name for name, _ in RETRIEVAL_COLUMNS] == ["row_index", *LINE_TYPES]


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("malformed", "llama-needle line 3: correct = 'yes' is not a finite bool"),
        ("garbage", "llama-needle jsonl line 2 is not JSON"),
        ("short", f"llama-needle printed {N_LINES - 1} of the {N_LINES} results asked for"),
    ],
)
def test_bad_output_fails_the_run_with_a_message(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, message: str
) -> None:
    monkeypatch.setenv("FAKE_RETRIEVAL_MODE", mode)
    record = run_retrieval(context(env), params(), env["text"])
    assert record.fields["status"] == "failed" and record.fields["exit_code"] == 0
    assert message in record.fields["error"]
    assert record.retrieval == []
    with Store(tmp_path / "r.sqlite") as store:
        store.record(record)
        assert store.count("retrieval") == 0 and store.runs(status="failed")[0]["error"] == record.fields["error"]
        assert store.find_ok(record.fields["config_hash"]) is None


def test_a_non_zero_exit_is_a_failed_run_that_keeps_its_lines(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_RETRIEVAL_MODE", "exit")
    record = run_retrieval(context(env), params(), env["text"])
    assert record.fields["status"] == "failed" and record.fields["exit_code"] == 1
    assert record.fields["error"] == ("llama-needle exited 1: error: --needle-rates must be at least 1, got 0.5")
    assert len(record.retrieval) == 2


def line(**changes: object) -> str:
    obj = {
        "length": 256,
        "depth": 0.25,
        "trial": 0,
        "keys": 1,
        "method": "kvc",
        "rate": 2,
        "budget": 128,
        "expected": "1",
        "output": "1",
        "correct": True,
        "n_prompt": 256,
        "kv_bytes": 8,
        "kv_bytes_full": 16,
        "kv_ratio": 0.5,
        "t_prefill_ms": 1,
        "t_compress_ms": 1.5,
        "t_decode_ms": 2.0,
    }
    obj.update(changes)
    return json.dumps({k: v for k, v in obj.items() if v is not None})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trial": True}, "trial = True is not a finite int"),
        ({"correct": 1}, "correct = 1 is not a finite bool"),
        ({"kv_ratio": math.nan}, "kv_ratio = nan is not a finite float or int"),
        ({"kv_bytes": None}, "line 1 lacks kv_bytes"),
        ({"method": "h2o"}, "method 'h2o' at rate 2 was not asked for"),
        ({"rate": 3}, "method 'kvc' at rate 3 was not asked for"),
        ({"method": "full"}, "method 'full' at rate 2 was not asked for"),
        ({"depth": 0.5}, "depth 0.5 was not asked for"),
        ({"length": 1024}, "length 1024 was not asked for"),
        ({"trial": 4}, "trial 4 is outside 0..3"),
        ({"keys": 2}, "keys = 2, asked for 1"),
    ],
)
def test_each_line_is_checked(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_lines(line(**changes) + "\n", params(), complete=False)
    assert message in str(info.value)


def test_lines_are_matched_to_the_request() -> None:
    rows = parse_lines(line() + "\n" + line(method="full", rate=1.0) + "\n", params(), complete=False)
    assert [(r["method"], r["rate"], r["correct"]) for r in rows] == [("kvc", 2.0, 1), ("full", 1.0, 1)]
    with pytest.raises(ParseError, match="line 2 repeats line 1"):
        parse_lines(line() + "\n" + line(output="2") + "\n", params(), complete=False)
    with pytest.raises(ParseError, match="printed 1 of the 112 results"):
        parse_lines(line(), params())


def test_parameters_are_checked() -> None:
    with pytest.raises(HarnessError, match="set by the retrieval evaluation itself"):
        params(extra=["--seed", "7"])
    with pytest.raises(HarnessError, match="put compression on a schedule"):
        params(extra=["--kv-compress", "kvc"])
    with pytest.raises(HarnessError, match="does not hold a prompt of 512 tokens"):
        params(ctx=512)
    with pytest.raises(HarnessError, match="unknown retrieval methods"):
        params(methods=["full", "h2o"])
    assert params(methods=["kvc"]).configs() == [("kvc", 2.0), ("kvc", 4.0)]
    assert params(methods=["full"]).expected_lines() == 2 * 2 * 4


# ------------------------------------------------------------------------------------------------ the report


def md_table(markdown: str, heading: str) -> tuple[list[str], dict[tuple[str, str], list[str]]]:
    header, body = evalkit.table_rows(markdown, heading)
    return header, {(r[0], r[1]): r for r in body}


def test_report_accuracy_and_ratios(env: dict[str, Path], tmp_path: Path) -> None:
    record = run_retrieval(context(env), params(), env["text"])
    with Store(tmp_path / "r.sqlite") as store:
        store.record(record)
        report = build_report(store, matrix="retrieval")
    header, rows = md_table(report.markdown, "#### smollm2-135m, 256 tokens")
    assert header == [
        "Method",
        "Rate",
        "Budget",
        "Accuracy %",
        "d=0.25",
        "d=0.75",
        "vs full",
        "n",
        "KV ratio",
        "Compress ms",
    ]
    assert list(rows) == [
        ("full", "1"),
        ("kvc", "2"),
        ("kvc", "4"),
        ("uniform", "2"),
        ("uniform", "4"),
        ("streaming", "2"),
        ("streaming", "4"),
    ]
    # full: 7 of 8 (trial 0 at depth 0.25 wrong); kvc: 6 of 8 (trial 3 at both depths)
    assert rows[("full", "1")][3:8] == ["87.5", "75.0", "100.0", "1.000", "8"]
    assert rows[("kvc", "2")][2:8] == ["128", "75.0", "75.0", "75.0", f"{75.0 / 87.5:.3f}", "8"]
    # uniform: every answer at depth 0.25 wrong, every one at 0.75 right
    assert rows[("uniform", "4")][3:7] == ["50.0", "0.0", "100.0", f"{50.0 / 87.5:.3f}"]
    # streaming: rate 2 always right, rate 4 wrong at the odd trials
    assert rows[("streaming", "2")][3] == "100.0" and rows[("streaming", "2")][6] == f"{100.0 / 87.5:.3f}"
    assert rows[("streaming", "4")][3:6] == ["50.0", "50.0", "50.0"]
    # medians over the 8 answers of a configuration: pages = 256 // 16 / rate + trial
    kv4 = statistics.median(round((4 + t) / 16, 4) for t in range(4) for _ in DEPTHS)
    assert rows[("kvc", "4")][8] == f"{kv4:.3f}" and rows[("kvc", "4")][9] == f"{statistics.median([1, 2, 3, 4]):.2f}"
    assert rows[("full", "1")][8:10] == ["1.000", "0.00"]
    _, rows512 = md_table(report.markdown, "#### smollm2-135m, 512 tokens")
    assert rows512[("kvc", "4")][2] == "128"

    table = list(csv.DictReader(io.StringIO(report.csv["retrieval.csv"])))
    assert len(table) == 2 * 7
    kvc = next(r for r in table if r["length"] == "512" and r["method"] == "kvc" and r["rate"] == "2.0")
    assert (kvc["n"], kvc["n_correct"], float(kvc["accuracy_pct"]), float(kvc["full_accuracy_pct"])) == (
        "8",
        "6",
        75.0,
        87.5,
    )
    assert float(kvc["vs_full"]) == pytest.approx(6 / 7)
    assert float(kvc["accuracy_pct_d0.25"]) == 75.0 and kvc["n_d0.75"] == "4"


def test_report_files_include_the_plot(env: dict[str, Path], tmp_path: Path) -> None:
    record = run_retrieval(context(env), params(), env["text"])
    with Store(tmp_path / "r.sqlite") as store:
        store.record(record)
        report = build_report(store, matrix="retrieval")
    written = {p.name for p in write_report(report, tmp_path / "out")}
    assert {"README.md", "retrieval.csv", "retrieval_accuracy_vs_kv.png"} <= written
    assert (tmp_path / "out" / "retrieval_accuracy_vs_kv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![retrieval_accuracy_vs_kv](retrieval_accuracy_vs_kv.png)" in (tmp_path / "out" / "README.md").read_text()


def test_ppl_against_kv_memory_plot(tmp_path: Path) -> None:
    """PPL runs with a KV size (and the paged cache's pages in use) get a PPL / KV memory plot; a compression method's
    budgets share one line."""
    from pyharness.report import kv_memory, ppl_series

    row = {"variant": "patched", "type_k": "f16", "type_v": "f16", "kv_mib": 180.0, "kv_used_mib": 45.0}
    a = {**row, "extra": "--kv-compress kvc --kv-compress-budget 1024 --kv-compress-every 512"}
    b = {**row, "extra": "--kv-compress kvc --kv-compress-budget 2048 --kv-compress-every 512"}
    c = {**row, "extra": "--kv-compress uniform --kv-compress-budget 2048 --kv-compress-every 512"}
    assert ppl_series(a) == ppl_series(b) == "patched --kv-compress kvc --kv-compress-every 512 KV f16"
    assert ppl_series(c) != ppl_series(a)
    assert ppl_series({**row, "extra": ""}) == "patched standard cache KV f16"
    assert kv_memory(a) == 45.0 and kv_memory({**row, "kv_used_mib": None}) == 180.0


# ------------------------------------------------------------------------------------------------ the matrix

RETRIEVAL = """\
[matrix]
name = "r"
variants = ["patched"]
backends = ["cpu"]
models = ["smollm2-135m"]

[flags]
flash_attn = "on"
threads = 2
extra = [[], ["--kv-compress-window", "16"]]

[[eval]]
kind = "retrieval"
lengths = [4096, 8192]
trials = 10
rates = [2, 2.5]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    return next(n for n, ln in enumerate(text.splitlines(), 1) if needle in ln)


def test_retrieval_eval_expands_with_its_defaults(tmp_path: Path) -> None:
    spec = matrix.load_matrix(write(tmp_path, RETRIEVAL))
    cells = spec.cells()
    assert [c.flags["extra"] for c in cells] == [[], ["--kv-compress-window", "16"]]
    assert cells[0].ev.values == {
        "lengths": [4096, 8192],
        "depths": [0.1, 0.3, 0.5, 0.7, 0.9],
        "trials": 10,
        "keys": 1,
        "methods": ["full", "kvc", "uniform", "streaming"],
        "rates": [2.0, 2.5],
        "ctx": 2 * 8192 + 256,
    }
    assert cells[0].ev.name == "retrieval(L4096,8192 d5 x10 k1 kvc,uniform,streaming R2,2.5 c16640)"
    p = matrix.retrieval_params(cells[1])
    assert p.threads == 2 and p.flash_attn == "on" and p.expected_lines() == 2 * 5 * 10 * (1 + 3 * 2)
    assert p.args()[-2:] == ["--kv-compress-window", "16"]


@pytest.mark.parametrize(
    ("edit", "needle", "message"),
    [
        (("lengths = [4096, 8192]", "lengths = [128]"), "lengths =", "'lengths' must be an integer >= 256"),
        (("trials = 10", "trials = 10\ndepths = [0, 0.5]"), "depths =", "'depths' must be a number strictly between"),
        (("trials = 10", "trials = 10\ndepths = [1.0]"), "depths =", "'depths' must be a number strictly between"),
        (("trials = 10", "trials = 0"), "trials =", "'trials' must be an integer >= 1"),
        (("trials = 10", "trials = 10\nkeys = 0"), "keys =", "'keys' must be an integer >= 1"),
        (("trials = 10", 'trials = 10\nmethods = ["full", "h2o"]'), "methods =", "'methods' must be a non-empty list"),
        (("rates = [2, 2.5]", "rates = [0.5, 2]"), "rates =", "'rates' must be a number >= 1"),
        (("rates = [2, 2.5]", 'rates = ["2"]'), "rates =", "'rates' must be a number >= 1"),
        (("trials = 10", "trials = 10\nctx = 8192"), "ctx =", "ctx = 8192 does not hold a prompt of 8192 tokens"),
        (("trials = 10", "trials = 10\nchunks = 4"), "chunks =", "unknown key 'chunks' in a retrieval [[eval]]"),
        (('variants = ["patched"]', 'variants = ["upstream"]'), "[[eval]]", "retrieval needs the patched variant"),
        (('["--kv-compress-window", "16"]', '["--seed", "7"]'), "extra =", "are the retrieval evaluation's own"),
        (('["--kv-compress-window", "16"]', '["--kv-compress", "kvc"]'), "extra =", "compress on a schedule"),
    ],
)
def test_retrieval_validation_errors_name_the_line(
    tmp_path: Path, edit: tuple[str, str], needle: str, message: str
) -> None:
    text = RETRIEVAL.replace(*edit)
    assert text != RETRIEVAL
    with pytest.raises(matrix.MatrixError) as info:
        matrix.load_matrix(write(tmp_path, text))
    assert info.value.problem.startswith(f"{tmp_path / 'm.toml'}:{line_of(text, needle)}: "), info.value.problem
    assert message in info.value.problem


def test_exclude_takes_a_list_of_argument_lists(tmp_path: Path) -> None:
    text = RETRIEVAL.replace('extra = [[], ["--kv-compress-window", "16"]]', 'extra = [[], ["--a"], ["--b"], ["--c"]]')
    spec = matrix.load_matrix(write(tmp_path, text + '\n[[exclude]]\nextra = [["--a"], ["--c"]]\n'))
    assert [c.flags["extra"] for c in spec.cells()] == [[], ["--b"]]
    spec = matrix.load_matrix(write(tmp_path, text + '\n[[exclude]]\nextra = ["--a"]\n'))  # one argument list
    assert [c.flags["extra"] for c in spec.cells()] == [[], ["--b"], ["--c"]]
    bad = text + "\n[[exclude]]\nextra = [1, 2]\n"
    with pytest.raises(matrix.MatrixError, match=f"m.toml:{line_of(bad, 'extra = [1')}: 'extra' in"):
        matrix.load_matrix(write(tmp_path, bad))


def test_a_retrieval_matrix_runs_through_the_fake_tool(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The matrix runner dispatches the kind: builds nothing, resolves the text, stores the rows, resumes."""
    ctx = context(env)
    monkeypatch.setattr(matrix, "resolve_model", lambda name: ctx.model)
    text = RETRIEVAL.replace("lengths = [4096, 8192]", "lengths = [256, 512]").replace("trials = 10", "trials = 4")
    text = text.replace("rates = [2, 2.5]", "rates = [2, 4]\ndepths = [0.25, 0.75]")
    spec = matrix.load_matrix(write(tmp_path, text))
    with Store(tmp_path / "r.sqlite") as store:
        result = matrix.run_matrix(spec, store, builder=lambda v, b: ctx.build, text=str(env["text"]), progress=False)
        assert (result.ran, result.ok, result.failed) == (2, 2, [])
        assert store.count("retrieval") == 2 * N_LINES
        again = matrix.run_matrix(spec, store, builder=lambda v, b: ctx.build, text=str(env["text"]), progress=False)
        assert (again.ran, again.skipped) == (0, 2)
    assert json.loads(env["args"].read_text())[-2:] == ["--kv-compress-window", "16"]


def test_shipped_kv_compress_matrices() -> None:
    root = paths.project_root() / "matrices"
    ppl = matrix.load_matrix(root / "kv-compress-cpu-ppl.toml")
    cells = {(c.flags["cache_type_k"], " ".join(c.flags["extra"])) for c in ppl.cells()}
    compressed = {
        ("f16", f"--kv-compress {m} --kv-compress-budget {b} --kv-compress-every 512" + sink)
        for m, sink in (("kvc", ""), ("uniform", ""), ("streaming", " --kv-compress-sink 4"))
        for b in (4096, 3277, 2048, 1024)
    }
    assert cells == {
        ("f16", ""),
        ("f16", "--kv-cache paged"),
        *compressed,
        ("q8_0", ""),
        ("q8_0", "--kv-compress kvc --kv-compress-budget 2048 --kv-compress-every 512"),
        ("q4_0", ""),
    }
    for cell in ppl.cells():
        p = matrix.ppl_params(cell)
        assert (p.ctx, p.chunks, p.batch, p.ubatch, p.threads, p.flash_attn) == (8192, 4, 512, 512, 2, "on")
        base = matrix.kld_base_of(cell)
        assert base is not None and (base.variant, base.cache_type_k, base.extra) == ("patched", "f16", ())
    assert round(8192 / 2.5) == 3277

    lengths = {"smollm2": [4096, 8192], "gemma3": [8192, 16384, 32768]}
    for name, model in (("smollm2", "smollm2-135m"), ("gemma3", "gemma3-270m")):
        h100 = matrix.load_matrix(root / f"kv-compress-h100-retrieval-{name}.toml")
        params = [matrix.retrieval_params(c) for c in h100.cells()]
        assert {c.model for c in h100.cells()} == {model}
        # one cell per length (a device call each), 50 trials per length
        assert [p.lengths for p in params] == [[n] for n in lengths[name]]
        for p in params:
            assert p.ctx == 2 * p.lengths[0] + 256
            assert (p.trials * len(p.depths), p.rates, p.methods, p.depths) == (
                50,
                [2.0, 2.5, 4.0, 8.0],
                ["full", "kvc", "uniform", "streaming"],
                [0.1, 0.3, 0.5, 0.7, 0.9],
            )
            assert (p.n_gpu_layers, p.batch, p.ubatch, p.flash_attn, p.cache_type_k) == (99, 2048, 512, "on", "f16")
            assert p.expected_lines() == 650

    cpu = matrix.load_matrix(root / "kv-compress-cpu-retrieval.toml")
    assert sorted(c.model for c in cpu.cells()) == ["gemma3-270m", "smollm2-135m"]
    for cell in cpu.cells():
        p = matrix.retrieval_params(cell)
        assert (p.lengths, p.trials, p.rates, p.threads, p.ctx) == ([2048], 10, [2.0, 2.5, 4.0, 8.0], 2, 4352)
        assert p.expected_lines() == 5 * 10 * (1 + 3 * 4)
