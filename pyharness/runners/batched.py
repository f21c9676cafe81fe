"""llama-batched-bench runs (`kind = "batched"` in a matrix): several sequences decoded together, their prompt shared
or not, and the KV cache's memory as llama.cpp logs it (issue 7's memory target: a paged pool of a quarter of what the
standard cache reserves runs the same batch).

llama-batched-bench runs every (pp, tg, pl) of `-npp x -ntg x -npl` in that order, each from an empty cache, and
prints one jsonl line per configuration (`--output-format jsonl`, on stdout). Two things it does silently or tersely:
a configuration whose context need `n_ctx_req` exceeds the context is skipped without a word (exit 0), and the first
batch that fails to decode ends the tool (exit 1, "llama_decode() failed"). So the runner stores one row per
requested configuration, with its status:

    ok       the tool printed its timings
    skipped  n_ctx_req > n_kv_max: llama-batched-bench passed over it (the need computed as the tool does)
    failed   the configuration the tool was running when it failed, with the log's warning and error lines
    not run  a configuration after the failure

and the memory figures of the log (`-lv 4`: llama.cpp's info lines): the context (`n_ctx`, `kv_unified`), the KV
buffers and the cache's size line (the standard cache's cells and streams, or the paged cache's pages and pool), the
compute and output buffers. llama-batched-bench prints no memory breakdown at exit (it does not call
`common_memory_breakdown_print`), so these lines are all there is. A run with any row not 'ok', or asked for the
paged cache and given the standard one, is stored as failed, with its rows and memory figures.
"""

from __future__ import annotations

import re
import signal
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pyharness.errors import HarnessError
from pyharness.runners import Execution, RunContext, cache_and_run_args, config_hash, execute, run_fields, tool_env
from pyharness.runners.bench import ParseError, jsonl_objects
from pyharness.store import RunRecord

KIND = "batched"
TOOL = "llama-batched-bench"
# arguments the runner sets itself (from the eval and [flags]); [flags] extra must not repeat them
OWN_ARGS = (
    "-m",
    "--model",
    "-c",
    "--ctx-size",
    "-npp",
    "-ntg",
    "-npl",
    "-pps",
    "--output-format",
    "-lv",
    "--verbosity",
    "--log-verbosity",
)
PAGED_ARGS = ("--kv-cache", "--kv-page-size", "--kv-pool-size")
JSONL_KEYS = (
    "n_kv_max",
    "n_batch",
    "n_ubatch",
    "flash_attn",
    "is_pp_shared",
    "n_gpu_layers",
    "n_threads",
    "n_threads_batch",
    "pp",
    "tg",
    "pl",
    "n_kv",
    "t_pp",
    "speed_pp",
    "t_tg",
    "speed_tg",
    "t",
    "speed",
)


def n_ctx_req(pp: int, tg: int, pl: int, *, shared: bool, unified: bool) -> int:
    """The context a configuration needs, as llama-batched-bench computes it before running it: with a shared prompt
    a unified cache holds the prompt once (its cells belong to every sequence), separate streams hold it per
    sequence."""
    if shared:
        return (pp if unified else pl * pp) + pl * tg
    return pl * (pp + tg)


def full_reservation(npp: list[int], ntg: list[int], npl: list[int]) -> int:
    """The largest context any configuration needs with one stream per sequence (what fits in every mode)."""
    return max(n_ctx_req(pp, tg, pl, shared=False, unified=False) for pp in npp for tg in ntg for pl in npl)


@dataclass
class BatchedParams:
    """One llama-batched-bench run: the eval's lists and context, and the cell's [flags]."""

    npp: list[int]
    ntg: list[int]
    npl: list[int]
    pps: bool = False
    ctx: int = 0  # 0: full_reservation()
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    threads: int | None = None
    batch: int | None = None
    ubatch: int | None = None
    n_gpu_layers: int | None = None
    extra: list[str] = field(default_factory=list)

    def validate(self) -> BatchedParams:
        """Checked, with the context resolved (0: the full reservation)."""
        for name in ("npp", "ntg", "npl"):
            values = getattr(self, name)
            if not values or any(int(v) < 1 for v in values):
                raise HarnessError(f"batched {name} must be a non-empty list of positive integers, got {values}")
        own = [a for a in self.extra if a in OWN_ARGS]
        if own:
            raise HarnessError(f"extra arguments {own} are set by the batched evaluation itself")
        return replace(self, ctx=self.ctx or full_reservation(self.npp, self.ntg, self.npl), extra=list(self.extra))

    def configs(self) -> list[tuple[int, int, int]]:
        """(pp, tg, pl) in the order llama-batched-bench runs them."""
        return [(pp, tg, pl) for pp in self.npp for tg in self.ntg for pl in self.npl]

    def args(self) -> list[str]:
        def join(values: list[int]) -> str:
            return ",".join(str(v) for v in values)

        out = ["-c", str(self.ctx), "-npp", join(self.npp), "-ntg", join(self.ntg), "-npl", join(self.npl)]
        if self.pps:
            out.append("-pps")
        out += cache_and_run_args(self)
        # jsonl rows on stdout; -lv 4: llama.cpp's info lines (the KV cache's size) on stderr, about 11 KB
        return [*out, "--output-format", "jsonl", "-lv", "4", *self.extra]


def requested_cache(args: list[str]) -> tuple[str, int | None]:
    """('paged' or 'standard', the --kv-pool-size asked for) from a command line (the last setting wins)."""
    cache, pool = "standard", None
    for i, arg in enumerate(args[:-1]):
        value = args[i + 1]
        if arg == "--kv-cache":
            cache = value
        elif arg == "--kv-page-size":
            cache = "paged"
        elif arg == "--kv-pool-size" and value.isdigit():
            pool = int(value)
    return cache, pool


# ------------------------------------------------------------------------------------------------ parsing

NUM = r"([0-9]+(?:\.[0-9]+)?)"
LEVEL = re.compile(r"^[0-9.]+ ([EW]) ")  # common_log's prefix (-lv): time, then the level letter
CTX_LINE = re.compile(r"llama_context: (n_ctx|n_ctx_seq|n_seq_max|kv_unified)\s+=\s+(\S+)")
N_HEAD_KV = re.compile(r"print_info: n_head_kv\s+=\s+(.+)$")
KV_BUFFER = re.compile(r"llama_kv_cache(?:_paged)?:\s+\S+ KV buffer size =\s*" + NUM + " MiB")
STANDARD_SIZE = re.compile(
    r"llama_kv_cache: size =\s*" + NUM + r" MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+) seqs\), "
    r"K \((\w+)\):\s*" + NUM + r" MiB, V \((\w+)\):\s*" + NUM + " MiB"
)
PAGED_SIZE = re.compile(
    r"llama_kv_cache_paged: size =\s*" + NUM + r" MiB \(\s*(\d+) pages of (\d+) slots,\s*(\d+) layers,\s*(\d+) seqs\), "
    r"K \((\w+)\):\s*" + NUM + r" MiB, V \((\w+)\):\s*" + NUM + r" MiB, positions:\s*" + NUM + " MiB"
)
COMPUTE = re.compile(r"\S+ compute buffer size =\s*" + NUM + " MiB")
OUTPUT = re.compile(r"\S+\s+output buffer size =\s*" + NUM + " MiB")
FALLBACK = "paged KV cache not used"


@dataclass
class KvMemory:
    """The memory figures of one run's log (MiB as llama.cpp prints them, two decimals); None where not logged."""

    cache: str = ""  # 'standard', 'paged', or '' when no cache was made
    n_ctx: int | None = None
    n_ctx_seq: int | None = None
    n_seq_max: int | None = None
    kv_unified: int | None = None
    kv_buffer_mib: float | None = None  # the KV buffers allocated (summed over devices and caches)
    kv_mib: float | None = None  # the size line(s): K + V (+ the paged cache's positions)
    k_mib: float | None = None
    v_mib: float | None = None
    positions_mib: float | None = None
    cells: int | None = None  # standard: cells per stream x streams
    n_stream: int | None = None
    pages: int | None = None  # paged: pages of all KV heads of a layer
    page_size: int | None = None
    n_head_kv: int | None = None
    pool_tokens: int | None = None  # paged: tokens per KV head the pool holds (pages / n_head_kv x page size)
    pool_tokens_requested: int | None = None  # --kv-pool-size
    compute_mib: float | None = None
    output_mib: float | None = None
    fallback: str = ""  # the line saying the paged cache was not used
    log_lines: str = ""  # the lines these figures come from

    def row(self) -> dict[str, Any]:
        return asdict(self)


def _sum(values: list[float]) -> float | None:
    return round(sum(values), 2) if values else None


def parse_memory(log: str) -> KvMemory:
    """The context and memory lines of a llama.cpp log (any tool that logs at -lv 4)."""
    mem = KvMemory()
    kept: list[str] = []
    buffers: list[float] = []
    computes: list[float] = []
    outputs: list[float] = []
    sizes: list[re.Match[str]] = []
    paged: list[re.Match[str]] = []
    for line in log.splitlines():
        if m := CTX_LINE.search(line):
            key, value = m.groups()
            if key == "kv_unified":
                mem.kv_unified = int(value == "true")
            elif value.isdigit():
                setattr(mem, key, int(value))
        elif m := N_HEAD_KV.search(line):
            heads = [int(h) for h in re.findall(r"\d+", m.group(1))]
            mem.n_head_kv = max(heads) if heads else None
        elif m := KV_BUFFER.search(line):
            buffers.append(float(m.group(1)))
        elif m := STANDARD_SIZE.search(line):
            sizes.append(m)
        elif m := PAGED_SIZE.search(line):
            paged.append(m)
        elif m := COMPUTE.search(line):
            computes.append(float(m.group(1)))
        elif m := OUTPUT.search(line):
            outputs.append(float(m.group(1)))
        elif FALLBACK in line:
            mem.fallback = line[line.index("llama") :].strip() if "llama" in line else line.strip()
        else:
            continue
        kept.append(line.strip())
    mem.kv_buffer_mib, mem.compute_mib, mem.output_mib = _sum(buffers), _sum(computes), _sum(outputs)
    if paged:
        mem.cache = "paged"
        mem.kv_mib = _sum([float(m.group(1)) for m in paged])
        mem.pages = sum(int(m.group(2)) for m in paged)
        mem.page_size = int(paged[0].group(3))
        mem.k_mib = _sum([float(m.group(7)) for m in paged])
        mem.v_mib = _sum([float(m.group(9)) for m in paged])
        mem.positions_mib = _sum([float(m.group(10)) for m in paged])
        if mem.n_head_kv:
            mem.pool_tokens = int(paged[0].group(2)) // mem.n_head_kv * mem.page_size
    elif sizes:
        mem.cache = "standard"
        mem.kv_mib = _sum([float(m.group(1)) for m in sizes])
        mem.cells = sum(int(m.group(2)) * int(m.group(5)) for m in sizes)
        mem.n_stream = int(sizes[0].group(5))
        mem.k_mib = _sum([float(m.group(7)) for m in sizes])
        mem.v_mib = _sum([float(m.group(9)) for m in sizes])
    mem.log_lines = "\n".join(kept)
    return mem


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """llama-batched-bench's jsonl rows (stdout); blank lines between them are skipped."""
    rows = []
    for number, obj in jsonl_objects(text, TOOL):
        missing = [k for k in JSONL_KEYS if k not in obj]
        if missing:
            raise ParseError(f"{TOOL} jsonl line {number} lacks {', '.join(missing)}")
        rows.append({k: obj[k] for k in JSONL_KEYS})
    return rows


def problem_lines(log: str, limit: int = 6) -> list[str]:
    """The warning and error lines of a log (without their time), each once, the last `limit` of them; lines
    without a level prefix that say 'error' or 'failed' when the log has no prefixes."""
    seen: list[str] = []
    prefixed = False
    for line in log.splitlines():
        match = LEVEL.match(line)
        prefixed = prefixed or match is not None
        if match:
            text = line[match.start(1) :].strip()
        elif not prefixed and ("error" in line.lower() or "failed" in line.lower()):
            text = line.strip()
        else:
            continue
        if text not in seen:
            seen.append(text)
    return seen[-limit:]


def failure_text(exe: Execution) -> str | None:
    """Why the tool failed, with the log's warning and error lines (else its last line), or None if it did not."""
    if exe.timed_out:
        return exe.failure(TOOL)
    if exe.returncode == 0:
        return None
    if exe.returncode < 0:
        try:
            how = f"{TOOL} was killed by {signal.Signals(-exe.returncode).name}"
        except ValueError:
            how = f"{TOOL} was killed by signal {-exe.returncode}"
    else:
        how = f"{TOOL} exited {exe.returncode}"
    problems = [p for p in problem_lines(exe.stderr) if "rounding down" not in p]
    if problems:
        return f"{how}: {'; '.join(problems)}"
    lines = [ln.strip() for ln in exe.stderr.splitlines() if ln.strip()]
    return f"{how} (last log line: {lines[-1]})" if lines else how


def label(pp: int, tg: int, pl: int) -> str:
    return f"pp={pp} tg={tg} pl={pl}"


def result_rows(
    params: BatchedParams, printed: list[dict[str, Any]], mem: KvMemory, failure: str | None
) -> list[dict[str, Any]]:
    """One row per requested configuration, in the tool's order, with its status (see the module's docstring)."""
    printed_at = {(r["pp"], r["tg"], r["pl"]): r for r in printed}
    unknown = [k for k in printed_at if k not in params.configs()]
    if unknown:
        raise ParseError(f"{TOOL} printed configurations that were not asked for: {unknown}")
    n_kv_max = mem.n_ctx if mem.n_ctx is not None else (printed[0]["n_kv_max"] if printed else None)
    unified = bool(mem.kv_unified)
    rows: list[dict[str, Any]] = []
    stopped = False
    for index, (pp, tg, pl) in enumerate(params.configs()):
        need = n_ctx_req(pp, tg, pl, shared=params.pps, unified=unified)
        row: dict[str, Any] = {"row_index": index, **dict.fromkeys(JSONL_KEYS), "n_ctx_req": need, "note": None}
        row.update(pp=pp, tg=tg, pl=pl)
        if (pp, tg, pl) in printed_at:
            row.update(printed_at[(pp, tg, pl)], status="ok")
        elif stopped or (failure is not None and mem.n_ctx is None):
            row.update(status="not run", note=f"{TOOL} had stopped: {failure}")
        elif n_kv_max is not None and need > n_kv_max:
            row.update(
                status="skipped",
                n_kv_max=n_kv_max,
                note=f"needs n_ctx {need} > n_kv_max {n_kv_max}: skipped by {TOOL} without a word",
            )
        elif failure is None:
            row.update(status="failed", note=f"{TOOL} printed no result for it (has its output changed?)")
        else:
            row.update(status="failed", n_kv_max=n_kv_max, note=failure)
            stopped = True
        rows.append(row)
    return rows


def run_problem(rows: list[dict[str, Any]], mem: KvMemory, failure: str | None, cache: str) -> str | None:
    """Why the run as a whole is stored as failed (the tool's failure, the paged cache not used, the first
    configuration that did not run), or None."""
    if failure is not None:
        where = next((r for r in rows if r["status"] == "failed"), None)
        return failure + (f" (at {label(where['pp'], where['tg'], where['pl'])})" if where else "")
    if cache == "paged" and mem.cache != "paged":
        why = mem.fallback or "no paged size line in the log"
        return f"--kv-cache paged was asked for but the paged cache was not used ({why})"
    bad = next((r for r in rows if r["status"] != "ok"), None)
    return f"{label(bad['pp'], bad['tg'], bad['pl'])} {bad['status']}: {bad['note']}" if bad else None


def batched_record(fields: dict[str, Any], exe: Execution, params: BatchedParams) -> RunRecord:
    """The record of a finished llama-batched-bench process: its rows and memory figures, 'ok' when every requested
    configuration ran, else 'failed' with the reason (the rows and figures are kept either way)."""
    fields = {**fields, **exe.fields()}
    mem = parse_memory(exe.stderr)
    cache, mem.pool_tokens_requested = requested_cache(exe.command)
    failure = failure_text(exe)
    try:
        rows = result_rows(params, parse_jsonl(exe.stdout), mem, failure)
    except ParseError as exc:
        fields.update(status="failed", error=str(exc))
        return RunRecord(fields=fields, kv_memory=mem.row() if mem.cache else None)
    problem = run_problem(rows, mem, failure, cache)
    fields.update(status="failed" if problem else "ok", error=problem)
    return RunRecord(fields=fields, batched=rows, kv_memory=mem.row() if mem.cache else None)


def batched_config(ctx: RunContext, params: BatchedParams) -> tuple[str, dict[str, Any]]:
    stored = asdict(params)
    return config_hash(KIND, ctx.build, ctx.host, ctx.model, stored), stored


def run_batched(ctx: RunContext, params: BatchedParams) -> RunRecord:
    """Run llama-batched-bench once and return the record to store."""
    params = params.validate()
    chash, stored = batched_config(ctx, params)
    tool = ctx.build.tool(TOOL)
    cmd = [str(tool), "-m", str(ctx.model.path), *params.args()]
    fields = run_fields(KIND, ctx, stored, chash)
    exe = execute(cmd, env=tool_env(ctx.build), timeout_s=ctx.timeout_s, echo=ctx.echo)
    return batched_record(fields, exe, params)
