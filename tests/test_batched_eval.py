"""llama-batched-bench runs (`kind = "batched"`): parsing the jsonl and the log's memory lines of real runs (fixtures),
the status of every requested configuration (ran, skipped for want of context, failed, not run), storing, the report
section, the matrix checks; and one small real run on the patched build."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness import matrix, paths
from pyharness.errors import HarnessError
from pyharness.report import build_report
from pyharness.runners import Execution, run_fields
from pyharness.runners.batched import (
    BatchedParams,
    KvMemory,
    ParseError,
    batched_record,
    full_reservation,
    n_ctx_req,
    parse_jsonl,
    parse_memory,
    problem_lines,
    requested_cache,
)
from pyharness.store import KV_MEMORY_COLUMNS, RunRecord, Store

PAGED_1152 = ["--kv-cache", "paged", "--kv-pool-size", "1152"]
PAGED_1024 = ["--kv-cache", "paged", "--kv-pool-size", "1024"]


def params(npp: list[int], ctx: int, extra: list[str] | None = None, npl: list[int] | None = None) -> BatchedParams:
    """The fixtures' settings (tests/fixtures/README.md): -ntg 8 -npl 16 -pps -fa on -t 2."""
    return BatchedParams(
        npp=npp, ntg=[8], npl=npl or [16], pps=True, ctx=ctx, flash_attn="on", threads=2, extra=extra or []
    ).validate()


def fixture_execution(stem: str, p: BatchedParams, returncode: int = 0) -> Execution:
    exe = evalkit.execution(evalkit.fixture(f"{stem}.stdout"), evalkit.fixture(f"{stem}.stderr"), returncode)
    exe.command = ["llama-batched-bench", "-m", "model.gguf", *p.args()]
    return exe


def record_of(stem: str, p: BatchedParams, returncode: int = 0) -> RunRecord:
    return batched_record({}, fixture_execution(stem, p, returncode), p)


# ------------------------------------------------------------------------------------------------ parsing


def test_context_need_as_the_tool_computes_it() -> None:
    # 16 sequences of 1792 + 256 tokens: a shared prompt is held once only by a unified cache
    assert n_ctx_req(1792, 256, 16, shared=True, unified=True) == 1792 + 16 * 256 == 5888
    assert n_ctx_req(1792, 256, 16, shared=True, unified=False) == 16 * 2048 == 32768
    assert n_ctx_req(1792, 256, 16, shared=False, unified=True) == 32768
    assert n_ctx_req(100, 28, 4, shared=False, unified=False) == 512
    assert full_reservation([64, 256], [8, 16], [2, 16]) == 16 * (256 + 16)


def test_arguments_put_the_eval_first_and_extra_last() -> None:
    p = BatchedParams(npp=[1792], ntg=[256], npl=[16], pps=True, ctx=0, threads=2, ubatch=512, extra=["-kvu"])
    args = p.validate().args()
    assert args[:8] == ["-c", "32768", "-npp", "1792", "-ntg", "256", "-npl", "16"]
    assert "-pps" in args and args[args.index("-t") + 1] == "2" and args[args.index("-ub") + 1] == "512"
    assert args[-5:] == ["--output-format", "jsonl", "-lv", "4", "-kvu"]
    assert "-pps" not in BatchedParams(npp=[8], ntg=[8], npl=[2]).validate().args()
    with pytest.raises(HarnessError, match="set by the batched evaluation"):
        BatchedParams(npp=[8], ntg=[8], npl=[2], extra=["-c", "512"]).validate()
    with pytest.raises(HarnessError, match="npl"):
        BatchedParams(npp=[8], ntg=[8], npl=[]).validate()


def test_requested_cache_reads_the_command_line() -> None:
    assert requested_cache(["x", "--kv-cache", "paged", "--kv-pool-size", "8192"]) == ("paged", 8192)
    assert requested_cache(["x", "--kv-page-size", "32"]) == ("paged", None)
    assert requested_cache(["x", "--kv-cache", "paged", "--kv-cache", "standard"]) == ("standard", None)
    assert requested_cache(["x", "-kvu"]) == ("standard", None)


def test_jsonl_rows_and_bad_lines() -> None:
    rows = parse_jsonl(evalkit.fixture("batched-upstream.stdout"))
    assert len(rows) == 1
    row = rows[0]
    assert (row["pp"], row["tg"], row["pl"], row["n_kv"], row["n_kv_max"], row["is_pp_shared"]) == (
        64,
        8,
        16,
        1152,
        4096,
        1,
    )
    assert row["speed_tg"] == pytest.approx(16 * 8 / row["t_tg"], rel=1e-4)
    assert parse_jsonl("") == []
    with pytest.raises(ParseError, match="line 2 is not JSON"):
        parse_jsonl(evalkit.fixture("batched-upstream.stdout").strip() + "\n|    PP |     TG |\n")
    with pytest.raises(ParseError, match="lacks n_kv_max, n_batch"):
        parse_jsonl('{"pp": 1, "tg": 1, "pl": 1}\n')


def test_memory_of_the_standard_cache_with_a_stream_per_sequence() -> None:
    mem = parse_memory(evalkit.fixture("batched-upstream.stderr"))
    assert (mem.cache, mem.n_ctx, mem.n_ctx_seq, mem.n_seq_max, mem.kv_unified) == ("standard", 4096, 256, 16, 0)
    # 256 cells in each of 16 streams; 30 layers x 3 KV heads x 64 x 2 bytes x (K and V) x 4096 cells = 90 MiB
    assert (mem.cells, mem.n_stream) == (4096, 16)
    assert mem.kv_mib == mem.kv_buffer_mib == 90.0 == 30 * 3 * 64 * 2 * 2 * 4096 / 2**20
    assert (mem.k_mib, mem.v_mib, mem.positions_mib, mem.pages) == (45.0, 45.0, None, None)
    assert (mem.compute_mib, mem.output_mib, mem.n_head_kv) == (98.25, 3.0, 3)
    assert "llama_kv_cache: size =   90.00 MiB (   256 cells,  30 layers, 16/16 seqs)" in mem.log_lines


def test_memory_of_the_unified_cache() -> None:
    mem = parse_memory(evalkit.fixture("batched-upstream-kvu.stderr"))
    assert (mem.cache, mem.n_ctx, mem.kv_unified, mem.cells, mem.n_stream, mem.kv_mib) == (
        "standard",
        1280,
        1,
        1280,
        1,
        28.12,
    )


def test_memory_of_the_paged_cache() -> None:
    mem = parse_memory(evalkit.fixture("batched-paged.stderr"))
    # --kv-pool-size 1152: 18 pages of 64 slots per KV head, 3 KV heads
    assert (mem.cache, mem.pages, mem.page_size, mem.n_head_kv, mem.pool_tokens) == ("paged", 54, 64, 3, 1152)
    assert (mem.kv_buffer_mib, mem.kv_mib, mem.k_mib, mem.v_mib, mem.positions_mib) == (25.71, 25.71, 12.66, 12.66, 0.4)
    assert mem.cells is None and mem.n_ctx == 4096 and mem.fallback == ""


def test_memory_columns_match_the_store() -> None:
    assert [name for name, _ in KV_MEMORY_COLUMNS] == list(KvMemory.__dataclass_fields__)


def test_problem_lines_keep_warnings_and_errors_once() -> None:
    lines = problem_lines(evalkit.fixture("batched-paged-small.stderr"))
    assert lines == [
        "W decode: failed to find a memory slot for batch of size 16",
        "E failed to decode the batch, n_batch = 2048, ret = 1",
        "E llama_batched_bench: llama_decode() failed",
    ]
    assert problem_lines("plain text\nan error here\nerror here too\n") == ["an error here", "error here too"]


# ------------------------------------------------------------------------------------------------ results


def test_every_configuration_ran() -> None:
    p = params([64], 1280, ["-kvu"])
    record = record_of("batched-upstream-kvu", p)
    assert record.fields["status"] == "ok" and record.fields["error"] is None
    [row] = record.batched
    assert (row["status"], row["n_ctx_req"], row["n_kv"], row["note"]) == ("ok", 192, 192, None)
    assert record.kv_memory is not None and record.kv_memory["kv_unified"] == 1


def test_a_configuration_that_does_not_fit_is_stored_as_skipped_and_fails_the_run() -> None:
    record = record_of("batched-upstream", params([64, 256], 4096))
    assert [r["status"] for r in record.batched] == ["ok", "skipped"]
    skipped = record.batched[1]
    assert skipped["n_ctx_req"] == 16 * (256 + 8) and skipped["speed"] is None
    assert record.fields["status"] == "failed"
    assert record.fields["error"] == (
        "pp=256 tg=8 pl=16 skipped: needs n_ctx 4224 > n_kv_max 4096: skipped by llama-batched-bench without a word"
    )
    assert record.kv_memory is not None and record.kv_memory["kv_mib"] == 90.0


def test_a_pool_that_runs_out_fails_the_run_with_the_logs_error() -> None:
    record = record_of("batched-paged-small", params([64], 4096, PAGED_1024), returncode=1)
    assert record.fields["status"] == "failed" and record.fields["exit_code"] == 1
    error = record.fields["error"]
    assert error.startswith("llama-batched-bench exited 1: W decode: failed to find a memory slot for batch of size 16")
    assert error.endswith("llama_decode() failed (at pp=64 tg=8 pl=16)")
    [row] = record.batched
    assert row["status"] == "failed" and "failed to find a memory slot" in row["note"]
    assert record.kv_memory is not None
    assert (record.kv_memory["cache"], record.kv_memory["pool_tokens"], record.kv_memory["pool_tokens_requested"]) == (
        "paged",
        1024,
        1024,
    )


def test_configurations_after_a_failure_are_not_run() -> None:
    """A crash after the first configuration: the next one failed, the last was never reached."""
    p = params([64, 128, 192], 4096, PAGED_1152)
    record = record_of("batched-paged", p, returncode=-11)
    assert [r["status"] for r in record.batched] == ["ok", "failed", "not run"]
    assert record.fields["error"].startswith("llama-batched-bench was killed by SIGSEGV (last log line: ")
    assert record.fields["error"].endswith("(at pp=128 tg=8 pl=16)")


def test_a_failure_before_the_context_exists_runs_nothing() -> None:
    p = params([64], 4096)
    exe = evalkit.execution("", "error: invalid argument: --kv-cache\n", 1)
    record = batched_record({}, exe, p)
    assert [r["status"] for r in record.batched] == ["not run"]
    assert record.fields["error"] == "llama-batched-bench exited 1: error: invalid argument: --kv-cache"
    assert record.kv_memory is None


def test_paged_asked_for_but_standard_made_fails() -> None:
    """The log of a standard cache under a command line that asked for the paged one (a fallback)."""
    p = params([64], 1280, ["-kvu", *PAGED_1152])
    record = record_of("batched-upstream-kvu", p)
    assert [r["status"] for r in record.batched] == ["ok"]
    assert record.fields["status"] == "failed"
    assert "paged cache was not used" in record.fields["error"]


def test_output_that_does_not_match_the_request_fails() -> None:
    record = record_of("batched-paged", params([32], 4096, PAGED_1152))
    assert record.fields["status"] == "failed" and "not asked for" in record.fields["error"]
    record = record_of("batched-paged", params([64], 4096, PAGED_1152, npl=[4, 16]))
    assert [r["status"] for r in record.batched] == ["failed", "ok"]
    assert "printed no result" in record.fields["error"]


# ------------------------------------------------------------------------------------------------ store and report


def stored(store: Store, stem: str, variant: str, p: BatchedParams, returncode: int = 0) -> int:
    build = evalkit.fake_build(variant, series="abc" if variant == "patched" else "none")
    ctx = evalkit.fake_context(build, matrix="batched")
    fields = run_fields("batched", ctx, {**p.__dict__, "extra": list(p.extra)})
    return store.record(batched_record(fields, fixture_execution(stem, p, returncode), p))


def test_store_keeps_rows_and_memory_of_failed_runs(tmp_path: Path) -> None:
    with Store(tmp_path / "r.sqlite") as store:
        run_id = stored(store, "batched-paged-small", "patched", params([64], 4096, PAGED_1024), 1)
        run = store.runs(status="failed")[0]
        assert run["run_id"] == run_id and "memory slot" in run["error"]
        rows = store.conn.execute("SELECT status, pp, n_ctx_req FROM batched_bench WHERE run_id = ?", (run_id,))
        assert [tuple(r) for r in rows] == [("failed", 64, 1152)]
        mem = store.conn.execute("SELECT * FROM kv_memory WHERE run_id = ?", (run_id,)).fetchone()
        assert (mem["cache"], mem["pages"], mem["kv_buffer_mib"]) == ("paged", 48, 22.85)


def test_report_shows_every_configuration_with_its_memory(tmp_path: Path) -> None:
    with Store(tmp_path / "r.sqlite") as store:
        stored(store, "batched-upstream", "upstream", params([64], 4096))  # the reference: 90 MiB
        stored(store, "batched-upstream", "upstream", params([64, 256], 4096))  # one configuration skipped
        stored(store, "batched-paged", "patched", params([64], 4096, PAGED_1152))
        stored(store, "batched-paged-small", "patched", params([64], 4096, PAGED_1024), 1)
        report = build_report(store, matrix="batched")
    md = report.markdown
    section = md[md.index("### Batched decoding and KV memory") : md.index("## Failed runs")]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| Variant | Extra | n_ctx | KV cache | KV MiB | KV / upstream |")
    body = lines[2:]
    assert len(body) == 5
    assert body[0].startswith(
        "| upstream | - | 4096 | standard: 4096 cells (16 streams) | 90.00 | 1.000 | 64+8 ×16 | 1152 |"
    )
    assert body[0].endswith("| ok |")
    assert "| 256+8 ×16 | 4224 | - | - | - | **skipped**: needs n_ctx 4224 > n_kv_max 4096" in body[2]
    paged = (
        "| patched | `--kv-cache paged --kv-pool-size 1152` | 4096 | paged: 1152 tokens (54 pages) | 25.71 | 0.286 |"
    )
    assert body[3].startswith(paged) and body[3].endswith("| ok |")
    assert "paged: 1024 tokens (48 pages) | 22.85 | 0.254 |" in body[4]
    assert "**failed**: llama-batched-bench exited 1: W decode: failed to find a memory slot" in body[4]
    assert "#### smollm2-135m" in section
    assert report.csv["batched.csv"].count("\n") == 6  # header and five rows


# ------------------------------------------------------------------------------------------------ matrix

BATCHED = """\
[matrix]
name = "b"
variants = ["upstream", "patched"]
backends = ["cpu"]
models = ["smollm2-135m"]

[flags]
threads = 2
extra = [[], ["--kv-cache", "paged", "--kv-pool-size", "512"]]

[[eval]]
kind = "batched"
npp = [64]
ntg = [8, 16]
npl = [4]
pps = true

[[exclude]]
variant = "upstream"
extra = ["--kv-cache", "paged", "--kv-pool-size", "512"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def test_batched_eval_expands_with_its_defaults(tmp_path: Path) -> None:
    spec = matrix.load_matrix(write(tmp_path, BATCHED))
    cells = spec.cells()
    assert [(c.variant, c.flags["extra"]) for c in cells] == [
        ("upstream", []),
        ("patched", []),
        ("patched", ["--kv-cache", "paged", "--kv-pool-size", "512"]),
    ]
    ev = cells[0].ev
    assert ev.values == {"npp": [64], "ntg": [8, 16], "npl": [4], "pps": True, "ctx": 4 * (64 + 16)}
    assert ev.name == "batched(pp64 tg8,16 pl4 pps c320)"
    p = matrix.batched_params(cells[2])
    assert p.threads == 2 and p.ctx == 320 and p.configs() == [(64, 8, 4), (64, 16, 4)]
    assert p.args()[-4:] == ["--kv-cache", "paged", "--kv-pool-size", "512"]


@pytest.mark.parametrize(
    ("edit", "needle", "message"),
    [
        (("npp = [64]\n", ""), "[[eval]]", "a batched [[eval]] needs 'npp'"),
        (("pps = true", "pps = 1"), "pps = 1", "'pps' must be true or false"),
        (("npl = [4]", "npl = [0]"), "npl = [0]", "'npl' must be an integer >= 1"),
        (("pps = true", "pps = true\nctx = [512, 1024]"), "ctx = [512", "'ctx' takes one value"),
        (("pps = true", "pps = true\nchunks = 2"), "chunks = 2", "unknown key 'chunks' in a batched [[eval]]"),
        (("extra = [[], ", 'extra = [["-c", "64"], '), "extra = [", "are the batched evaluation's own"),
        (('variant = "upstream"\nextra', 'variant = "patched"\nextra'), "extra = [", "only the patched build has"),
    ],
)
def test_batched_validation_errors_name_the_line(
    tmp_path: Path, edit: tuple[str, str], needle: str, message: str
) -> None:
    text = BATCHED.replace(*edit)
    assert text != BATCHED
    with pytest.raises(matrix.MatrixError) as info:
        matrix.load_matrix(write(tmp_path, text))
    assert info.value.problem.startswith(f"{tmp_path / 'm.toml'}:{line_of(text, needle)}: ")
    assert message in info.value.problem


def test_shipped_batched_matrix() -> None:
    spec = matrix.load_matrix(paths.project_root() / "matrices" / "paged-kv-cpu-batched.toml")
    cells = {(c.variant, " ".join(c.flags["extra"]), c.ev.values["ctx"]) for c in spec.cells()}
    assert cells == {
        ("upstream", "", 32768),
        ("patched", "", 32768),
        ("patched", "--kv-cache paged --kv-pool-size 8192", 32768),
        ("patched", "--kv-cache paged --kv-pool-size 2048", 32768),
        ("upstream", "", 8192),
        ("upstream", "-kvu", 8192),
    }
    for cell in spec.cells():
        p = matrix.batched_params(cell)
        assert p.configs() == [(1920, 128, 16)] and p.pps
        # every sequence holds 2048 tokens; the full reservation is 16 x 2048
        assert n_ctx_req(1920, 128, 16, shared=True, unified=False) == 16 * 2048 == 4 * 8192


# ------------------------------------------------------------------------------------------------ a real run


SMALL = """\
[matrix]
name = "b"
variants = ["patched"]
backends = ["cpu"]
models = ["{model}"]

[flags]
flash_attn = "on"
threads = 1
extra = [[], ["--kv-cache", "paged", "--kv-pool-size", "512"], ["--kv-cache", "paged", "--kv-pool-size", "256"]]

[[eval]]
kind = "batched"
npp = [64]
ntg = [72]
npl = [4]
pps = true
ctx = 1024
"""


@pytest.mark.slow
def test_small_batched_matrix_on_the_patched_build(tmp_path: Path) -> None:
    """The standard cache and two paged pools on SmolLM2 (seconds): 4 sequences of 64 + 72 tokens need a page for the
    shared prompt and two per sequence for the generated tokens, 9 per KV head; a pool has pool/64 pages plus one per
    sequence, so 512 tokens (12 pages) hold the batch and 256 (8) run out."""
    text = SMALL.format(model=evalkit.real_model())
    spec = matrix.load_matrix(write(tmp_path, text))
    with Store(tmp_path / "r.sqlite") as store:
        result = matrix.run_matrix(
            spec, store, builder=matrix.default_builder(no_build=True, root=None), progress=False
        )
        assert (result.ran, result.ok, len(result.failed)) == (3, 2, 1)
        assert "failed to find a memory slot" in result.failed[0][2]
        mem = {
            r["pool_tokens_requested"]: dict(r)
            for r in store.conn.execute("SELECT * FROM kv_memory JOIN runs USING (run_id) WHERE matrix = 'b'")
        }
        assert mem[None]["cache"] == "standard" and mem[None]["cells"] == 1024
        # the pool the cache logs: pool/64 pages and a slack page per sequence, per KV head
        assert mem[512]["cache"] == "paged" and mem[512]["pool_tokens"] == (512 // 64 + 4) * 64
        assert mem[256]["pool_tokens"] == (256 // 64 + 4) * 64 and mem[256]["kv_buffer_mib"] < mem[512]["kv_buffer_mib"]
        statuses = [tuple(r) for r in store.conn.execute("SELECT status, speed FROM batched_bench ORDER BY run_id")]
        assert [s for s, _ in statuses] == ["ok", "ok", "failed"]
        assert all(speed > 0 for s, speed in statuses if s == "ok")
