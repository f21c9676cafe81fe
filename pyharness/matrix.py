"""`pyharness matrix FILE.toml`: a declarative evaluation matrix, expanded into runs and resumed by configuration hash.

File format
-----------
::

    [matrix]
    name = "default"                    # stored with every run (runs.matrix); default: the file's stem
    description = "..."
    variants = ["upstream", "patched"]  # axes: every combination becomes cells
    backends = ["cpu"]
    models = ["smollm2-135m"]           # model names, .gguf paths, or synth:SHAPE[:FTYPE]
    timeout = 900                       # seconds per run (optional)
    gpu_kind = "H100"                   # optional: cuda cells need this GPU kind (see pyharness.executors)

    [flags]                             # runtime flags: a list is an axis, a scalar is the same for every cell
    kv = ["f16", "q8_0"]                # K and V cache type together (or cache_type_k / cache_type_v)
    flash_attn = "on"                   # on | off | auto | int8 (true/false/1/0/-1/2 too; int8 needs kv = "q8_kv")
    threads = 2
    # n_gpu_layers = 99, batch = 2048, ubatch = 512,
    # extra = ["--flag"] (one argument list) or [[], ["--flag"]] (an axis of argument lists)

    [[eval]]                            # evaluations: each is crossed with all of the above
    kind = "ppl"                        # llama-perplexity
    ctx = 128
    chunks = 4
    # text = "path/to/wiki.test.raw"    # default: --text / $PYHARNESS_TEXT / datasets
    kld_base = { variant = "upstream", kv = "f16" }   # KL divergence against this base (omit for none)

    [[eval]]
    kind = "bench"                      # llama-bench -o jsonl
    prompt = [32]
    gen = [8]
    depth = [0, 128]
    repetitions = 2

    [[eval]]
    kind = "ops"                        # test-backend-ops --output sql (model-independent; run once per build)
    mode = "perf"
    ops = "FLASH_ATTN_EXT"
    params = "hsk=64"

    [[eval]]
    kind = "sampler"                    # per-call sampling latency (pyharness.sampler_bench; once per build)
    modes = ["chain", "sortfree", "op", "backend-chain", "backend-sortfree"]
    vocab = [151936]
    rows = [1]                          # rows of logits sampled per call (backend modes and op)
    temp = 0.8, top_k = 40, top_p = 0.9, min_p = 0.0, iters = 200
    backend_name = "CPU"                # or "CUDA0"; threads = 1 for a CPU backend

    [[eval]]
    kind = "decode"                     # llama-completion tokens/s per sampler setup (eval + sampling time)
    samplers = ["greedy", "chain", "chain-bs", "sortfree", "sortfree-bs"]
    n_gen = 128
    repetitions = 3

    [[eval]]
    kind = "paged-generate"             # standard vs paged KV cache: greedy tokens of several sequences at once
    n_gen = 256                         # tokens per sequence (one token of each sequence per step)
    # ctx = 2048, ubatch = 512, page_size = 64, prompts = ["...", ...] (default: 4 prompts)

    [[eval]]
    kind = "paged-server"               # llama-server --parallel N, standard vs --kv-cache paged
    parallel = 4
    n_predict = 128
    repeats = 2                         # trials per cache and mode (determinism)
    modes = ["concurrent", "sequential"]
    # ctx = 2048, prompts = [...], server_args = ["-kvu"]; [flags] extra and server_args go to both servers

    [[eval]]
    kind = "batched"                    # llama-batched-bench --output-format jsonl, with the KV cache's memory
    npp = [1920]                        # prompt tokens, generated tokens, parallel sequences (lists: cross product)
    ntg = [128]
    npl = [16]
    pps = true                          # one prompt shared by every sequence (llama_memory_seq_cp)
    ctx = 32768                         # n_ctx (default: the largest npl x (npp + ntg)); [flags] extra goes to the tool

    [[eval]]
    kind = "retrieval"                  # llama-needle: needle-in-a-haystack accuracy under KV compression (patched)
    lengths = [4096, 8192]              # prompt lengths in tokens (>= 256)
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]  # where the key is planted, a fraction of the haystack (0 < depth < 1)
    trials = 50                         # trials per (length, depth)
    keys = 1                            # keys planted per haystack (one is asked for)
    methods = ["full", "kvc", "uniform", "streaming"]   # full once at rate 1, each other method at every rate
    rates = [2, 2.5, 4, 8]              # compression rates R >= 1: budget per (layer, KV head) = length / R
    # ctx = 16640 (default: 2 x max(lengths) + 256: the prefilled sequence and its copy share one pool),
    # text = "..." as for ppl; [flags] extra goes to the tool (--kv-compress-window, -sink, -obs)

    [[exclude]]                         # drop the cells matching every key given
    variant = "upstream"
    extra = ["--flag"]                  # or a list of argument lists: any of them

Anything else (an unknown key or table, an unknown variant or backend, a model that does not resolve, contradictory
flags such as a quantized V cache with flash_attn = "off") fails before anything runs, naming the file and line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import sys
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyharness.build import BACKENDS, VARIANTS, BuildInfo
from pyharness.errors import HarnessError
from pyharness.runners import (
    SYNTH_PREFIX,
    ModelRef,
    RunContext,
    canonical,
    check_synth,
    now_utc,
    resolve_model,
    synth_path,
)
from pyharness.runners.batched import OWN_ARGS as BATCHED_OWN_ARGS
from pyharness.runners.batched import PAGED_ARGS, BatchedParams, batched_config, full_reservation, run_batched
from pyharness.runners.bench import BenchParams, OpsParams, bench_config, run_backend_ops, run_bench
from pyharness.runners.decode import DecodeParams, run_decode
from pyharness.runners.paged import (
    PagedGenerateParams,
    PagedServerParams,
    run_paged_generation,
    run_paged_server,
)
from pyharness.runners.perplexity import (
    KV_TYPES,
    UNQUANTIZED_KV,
    KldBase,
    PplParams,
    PplRequest,
    normalize_fa,
    ppl_config,
    run_perplexity,
)
from pyharness.runners.retrieval import OWN_ARGS as RETRIEVAL_OWN_ARGS
from pyharness.runners.retrieval import (
    SCHEDULE_ARGS,
    RetrievalParams,
    retrieval_config,
    run_retrieval,
)
from pyharness.runners.sampler import SamplerBenchParams, run_sampler_bench
from pyharness.store import RunRecord, Store

TOP_KEYS = {"matrix", "flags", "eval", "exclude"}
MATRIX_KEYS = {"name", "description", "variants", "backends", "models", "timeout", "gpu_kind"}
FLAG_KEYS = {"kv", "cache_type_k", "cache_type_v", "flash_attn", "threads", "n_gpu_layers", "batch", "ubatch", "extra"}
# evaluations that do not run a model: once per build (and flag axis "extra")
MODEL_FREE_KINDS = ("ops", "sampler")

EVAL_KEYS = {
    "ppl": {"kind", "name", "ctx", "chunks", "text", "kld_base"},
    "bench": {"kind", "name", "prompt", "gen", "depth", "repetitions"},
    "ops": {"kind", "name", "mode", "ops", "params", "backend_name"},
    "decode": {"kind", "name", "samplers", "n_gen", "repetitions", "prompt", "ctx"},
    "sampler": {
        "kind",
        "name",
        "modes",
        "vocab",
        "rows",
        "temp",
        "top_k",
        "top_p",
        "min_p",
        "iters",
        "backend_name",
        "threads",
    },
}
EVAL_KEYS["paged-generate"] = {"kind", "name", "n_gen", "ctx", "ubatch", "page_size", "prompts"}
EVAL_KEYS["paged-server"] = {
    "kind",
    "name",
    "parallel",
    "n_predict",
    "ctx",
    "repeats",
    "modes",
    "prompts",
    "server_args",
}
EVAL_KEYS["batched"] = {"kind", "name", "npp", "ntg", "npl", "pps", "ctx"}
EVAL_KEYS["retrieval"] = {"kind", "name", "lengths", "depths", "trials", "keys", "methods", "rates", "ctx", "text"}
PAGED_KINDS = ("paged-generate", "paged-server")
KLD_BASE_KEYS = {"variant", "backend", "kv", "cache_type_k", "cache_type_v", "flash_attn", "extra"}
EXCLUDE_KEYS = {"variant", "backend", "model", "eval", *FLAG_KEYS}


# ------------------------------------------------------------------------------------------------ line numbers


class Locator:
    """Line numbers of tables and keys in a TOML text (tomllib gives none): `[table]` / `[[array]]` headers, then
    `key =` lines inside the n-th instance of a table."""

    HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*\]\]?\s*(#.*)?$")
    KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str) -> None:
        self.sections: list[tuple[str, int, int, int]] = []  # (table, instance, first line, last line)
        counts: dict[str, int] = {}
        current = ("", 0, 1)
        lines = text.splitlines()
        self.lines = lines
        for number, line in enumerate(lines, 1):
            match = self.HEADER.match(line)
            if match:
                self.sections.append((current[0], current[1], current[2], number - 1))
                name = match.group(2).strip().strip("\"'")
                instance = counts.get(name, 0)
                counts[name] = instance + 1
                current = (name, instance, number)
        self.sections.append((current[0], current[1], current[2], len(lines)))

    def table(self, name: str, instance: int = 0) -> int:
        for table, inst, first, _ in self.sections:
            if table == name and inst == instance:
                return first
        return 1

    def key(self, table: str, key: str, instance: int = 0) -> int:
        for name, inst, first, last in self.sections:
            if name != table or inst != instance:
                continue
            for number in range(first, last + 1):
                match = self.KEY.match(self.lines[number - 1])
                if match and match.group(1).strip('"') == key:
                    return number
            return first
        return 1


class MatrixError(HarnessError):
    pass


@dataclass
class Checker:
    path: Path
    loc: Locator

    def fail(self, line: int, problem: str, fix: str = "") -> MatrixError:
        return MatrixError(f"{self.path}:{line}: {problem}", fix)


# ------------------------------------------------------------------------------------------------ the spec


@dataclass
class EvalSpec:
    kind: str
    index: int  # position among [[eval]] tables
    name: str
    values: dict[str, Any]


@dataclass
class Cell:
    """One run of the matrix (before it has a build)."""

    variant: str
    backend: str
    model: str
    flags: dict[str, Any]
    ev: EvalSpec

    def label(self) -> str:
        bits = [f"{self.variant}-{self.backend}"]
        if self.ev.kind not in MODEL_FREE_KINDS:
            bits.append(self.model)
        kt, vt = self.flags.get("cache_type_k"), self.flags.get("cache_type_v")
        if self.ev.kind not in MODEL_FREE_KINDS:
            bits.append(f"kv={kt}" if kt == vt else f"k={kt},v={vt}")
            bits.append(f"fa={self.flags.get('flash_attn')}")
        if self.flags.get("extra"):
            bits.append(" ".join(self.flags["extra"]))
        bits.append(self.ev.name)
        return " ".join(bits)

    def key(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "backend": self.backend,
            "model": self.model,
            "flags": self.flags,
            "eval": {"kind": self.ev.kind, **self.ev.values},
        }


@dataclass
class MatrixSpec:
    path: Path
    name: str
    description: str
    variants: list[str]
    backends: list[str]
    models: list[str]
    timeout: float | None
    flag_axes: dict[str, list[Any]]
    evals: list[EvalSpec]
    excludes: list[dict[str, Any]]
    loc: Locator
    model_lines: dict[str, int] = field(default_factory=dict)
    gpu_kind: str = ""  # the GPU kind cuda cells are pinned to ("" = any); a Ray resource of that name
    only: str = ""  # a regular expression: only the cells whose label it matches (select_cells); "" = every cell

    def cells(self) -> list[Cell]:
        """Every combination, variants x backends x models x flag axes x evals, minus the excluded ones (and, with
        `only`, those whose label it does not match)."""
        axes = list(self.flag_axes)
        out: list[Cell] = []
        for ev in self.evals:
            models = self.models if ev.kind not in MODEL_FREE_KINDS else self.models[:1]
            flag_axes = axes if ev.kind not in MODEL_FREE_KINDS else [a for a in axes if a == "extra"]
            for variant, backend, model in itertools.product(self.variants, self.backends, models):
                for combo in itertools.product(*(self.flag_axes[a] for a in flag_axes)):
                    flags = expand_flags(dict(zip(flag_axes, combo, strict=True)))
                    cell = Cell(variant, backend, model, flags, ev)
                    if not any(excluded(cell, ex) for ex in self.excludes):
                        out.append(cell)
        if self.only:
            pattern = re.compile(self.only)
            out = [c for c in out if pattern.search(c.label())]
        return out


def select_cells(spec: MatrixSpec, pattern: str) -> MatrixSpec:
    """The matrix restricted to the cells whose label (as `--dry-run` lists it) `pattern` matches (re.search).

    The cells keep their configuration hashes, so what one selection stores, the whole matrix finds stored.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise MatrixError(
            f"--only {pattern!r} is not a regular expression: {exc}", "escape regex characters, e.g. '\\+' for '+'"
        ) from exc
    labels = [c.label() for c in spec.cells()]
    if not any(compiled.search(label) for label in labels):
        raise MatrixError(
            f"--only {pattern!r} matches none of the {len(labels)} cells of {spec.path}",
            f"`pyharness matrix {spec.path} --dry-run` lists their labels",
        )
    return dataclasses.replace(spec, only=pattern)


def expand_flags(raw: dict[str, Any]) -> dict[str, Any]:
    flags = dict(raw)
    if "kv" in flags:
        kv = flags.pop("kv")
        flags["cache_type_k"] = kv
        flags["cache_type_v"] = kv
    flags.setdefault("cache_type_k", "f16")
    flags.setdefault("cache_type_v", "f16")
    flags["flash_attn"] = normalize_fa(flags.get("flash_attn", "auto"))
    flags["extra"] = list(flags.get("extra", []))
    return flags


def excluded(cell: Cell, ex: dict[str, Any]) -> bool:
    for key, want in ex.items():
        if key == "variant":
            have: Any = cell.variant
        elif key == "backend":
            have = cell.backend
        elif key == "model":
            have = cell.model
        elif key == "eval":
            if want not in (cell.ev.kind, cell.ev.name):
                return False
            continue
        elif key == "kv":
            if not (cell.flags.get("cache_type_k") == want and cell.flags.get("cache_type_v") == want):
                return False
            continue
        elif key == "flash_attn":
            have, want = cell.flags.get("flash_attn"), normalize_fa(want)
        elif key == "extra" and want and all(isinstance(w, list) for w in want):
            if cell.flags.get("extra") not in want:  # a list of argument lists: any of them
                return False
            continue
        else:
            have = cell.flags.get(key)
        if have != want:
            return False
    return True


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def load_matrix(path: Path | str) -> MatrixSpec:
    """Parse and check a matrix file without running or fetching anything."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise HarnessError(f"cannot read matrix file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MatrixError(f"{path}: invalid TOML: {exc}") from exc
    loc = Locator(text)
    chk = Checker(path, loc)

    for key in data:
        if key not in TOP_KEYS:
            raise chk.fail(
                loc.table(key) if loc.table(key) != 1 else loc.key("", key),
                f"unknown table or key '{key}'",
                f"known: {', '.join(sorted(TOP_KEYS))}",
            )
    if "matrix" not in data or not isinstance(data["matrix"], dict):
        raise chk.fail(1, "no [matrix] table", "add [matrix] with variants, backends and models")
    top = data["matrix"]
    for key in top:
        if key not in MATRIX_KEYS:
            raise chk.fail(
                loc.key("matrix", key), f"unknown key '{key}' in [matrix]", f"known: {', '.join(sorted(MATRIX_KEYS))}"
            )

    def strings(table: str, key: str, allowed: Iterable[str] | None, what: str) -> list[str]:
        value = top.get(key)
        line = loc.key(table, key)
        if value is None:
            raise chk.fail(loc.table(table), f"[{table}] has no '{key}'")
        values = _as_list(value)
        if not values or not all(isinstance(v, str) for v in values):
            raise chk.fail(line, f"'{key}' must be a non-empty list of strings")
        if allowed is not None:
            for v in values:
                if v not in allowed:
                    raise chk.fail(line, f"unknown {what} '{v}'", f"choose from: {', '.join(allowed)}")
        return list(dict.fromkeys(values))

    variants = strings("matrix", "variants", VARIANTS, "variant")
    backends = strings("matrix", "backends", BACKENDS, "backend")
    models = strings("matrix", "models", None, "model")
    model_lines = {m: loc.key("matrix", "models") for m in models}
    for m in models:
        check_model_name(m, chk.fail, model_lines[m])
    timeout = top.get("timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise chk.fail(loc.key("matrix", "timeout"), "timeout must be a positive number of seconds")
    gpu_kind = top.get("gpu_kind", "")
    if not isinstance(gpu_kind, str) or (gpu_kind and not re.fullmatch(r"[A-Za-z0-9_.:\-]+", gpu_kind)):
        raise chk.fail(loc.key("matrix", "gpu_kind"), f'gpu_kind must be a GPU kind such as "H100", got {gpu_kind!r}')
    if gpu_kind and "cuda" not in backends:
        raise chk.fail(loc.key("matrix", "gpu_kind"), f"gpu_kind = {gpu_kind!r} but no backend is cuda")

    flags_raw = data.get("flags", {})
    if not isinstance(flags_raw, dict):
        raise chk.fail(loc.key("", "flags"), "'flags' must be a table")
    flag_axes = check_flags(flags_raw, chk, backends)

    evals_raw = data.get("eval", [])
    if not isinstance(evals_raw, list) or not evals_raw:
        raise chk.fail(loc.table("matrix"), "no [[eval]] tables", "add at least one [[eval]] with kind = ppl or bench")
    evals = [check_eval(i, ev, chk, flag_axes) for i, ev in enumerate(evals_raw)]
    names = [e.name for e in evals]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise chk.fail(loc.table("eval", i), f"two evaluations are both named '{name}'", "give one a `name`")

    excludes = []
    excludes_raw = data.get("exclude", [])
    if not isinstance(excludes_raw, list):
        raise chk.fail(loc.table("exclude"), "'exclude' must be an array of tables: write [[exclude]]")
    for i, ex in enumerate(excludes_raw):
        for key in ex:
            if key not in EXCLUDE_KEYS:
                raise chk.fail(
                    loc.key("exclude", key, i),
                    f"unknown key '{key}' in [[exclude]]",
                    f"known: {', '.join(sorted(EXCLUDE_KEYS))}",
                )
        if "variant" in ex and ex["variant"] not in VARIANTS:
            raise chk.fail(loc.key("exclude", "variant", i), f"unknown variant '{ex['variant']}'")
        if "backend" in ex and ex["backend"] not in BACKENDS:
            raise chk.fail(loc.key("exclude", "backend", i), f"unknown backend '{ex['backend']}'")
        if "extra" in ex:
            extra = ex["extra"]
            lists = extra if isinstance(extra, list) and extra and all(isinstance(v, list) for v in extra) else [extra]
            if not all(isinstance(v, list) and all(isinstance(a, str) for a in v) for v in lists):
                raise chk.fail(
                    loc.key("exclude", "extra", i),
                    "'extra' in [[exclude]] must be a list of arguments or a list of argument lists",
                )
        excludes.append(ex)

    spec = MatrixSpec(
        path=path,
        name=str(top.get("name") or path.stem),
        description=str(top.get("description", "")),
        variants=variants,
        backends=backends,
        models=models,
        timeout=timeout,
        flag_axes=flag_axes,
        evals=evals,
        excludes=excludes,
        loc=loc,
        model_lines=model_lines,
        gpu_kind=gpu_kind,
    )
    cells = spec.cells()
    if not cells:
        raise chk.fail(
            loc.table("exclude") if excludes else 1, "the matrix expands to no cells", "check [[exclude]] and the axes"
        )
    for cell in cells:
        check_cell(cell, chk)
    return spec


def check_model_name(name: str, fail: Callable[..., MatrixError], line: int) -> None:
    """Does the name resolve (without fetching or generating anything)?"""
    try:
        if name.startswith(SYNTH_PREFIX):
            check_synth(name)
        elif name.endswith(".gguf") or "/" in name:
            if not Path(name).expanduser().is_file():
                raise HarnessError(f"model file {name} does not exist")
        else:
            from pyharness.models import find_spec

            find_spec(name)
    except HarnessError as exc:
        raise fail(line, f"model '{name}' does not resolve: {exc.problem}", exc.fix) from exc


def check_flags(raw: dict[str, Any], chk: Checker, backends: list[str]) -> dict[str, list[Any]]:
    loc = chk.loc
    axes: dict[str, list[Any]] = {}
    for key, value in raw.items():
        line = loc.key("flags", key)
        if key not in FLAG_KEYS:
            raise chk.fail(line, f"unknown key '{key}' in [flags]", f"known: {', '.join(sorted(FLAG_KEYS))}")
        if key == "extra":
            if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
                values = value
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                values = [value]
            else:
                raise chk.fail(line, "'extra' must be a list of arguments or a list of argument lists")
            for v in values:
                if not all(isinstance(a, str) for a in v):
                    raise chk.fail(line, "'extra' arguments must be strings")
            axes[key] = [list(v) for v in values]
            continue
        values = _as_list(value)
        if not values:
            raise chk.fail(line, f"'{key}' is an empty list")
        for v in values:
            if key in ("kv", "cache_type_k", "cache_type_v"):
                if v not in KV_TYPES:
                    raise chk.fail(line, f"unknown KV cache type '{v}'", f"use one of: {', '.join(KV_TYPES)}")
            elif key == "flash_attn":
                try:
                    normalize_fa(v)
                except HarnessError as exc:
                    raise chk.fail(line, exc.problem) from exc
            elif not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise chk.fail(line, f"'{key}' must be a non-negative integer (or a list of them), got {v!r}")
        axes[key] = values
    if "kv" in axes and ({"cache_type_k", "cache_type_v"} & set(axes)):
        raise chk.fail(
            loc.key("flags", "kv"),
            "contradictory flags: 'kv' sets both cache types, and cache_type_k / cache_type_v set them again",
            "use either kv or cache_type_k/cache_type_v",
        )
    ngl = [v for v in axes.get("n_gpu_layers", []) if v > 0]
    if ngl and backends == ["cpu"]:
        raise chk.fail(
            loc.key("flags", "n_gpu_layers"),
            f"contradictory flags: n_gpu_layers = {ngl[0]} but the only backend is cpu",
            "drop n_gpu_layers or add backend cuda",
        )
    return axes


def _int_list(value: Any, line: int, key: str, chk: Checker, minimum: int = 0) -> list[int]:
    values = _as_list(value)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values):
        raise chk.fail(line, f"'{key}' must be an integer >= {minimum} or a non-empty list of them")
    return values


def _one_int(value: Any, line: int, key: str, chk: Checker, minimum: int = 0) -> int:
    """A single integer; a list of several is an error (it would otherwise look like an axis that silently isn't)."""
    values = _int_list(value, line, key, chk, minimum)
    if len(values) > 1:
        raise chk.fail(line, f"'{key}' takes one value, got {len(values)}", f"write one [[eval]] per value of '{key}'")
    return values[0]


def check_eval(index: int, ev: Any, chk: Checker, flag_axes: dict[str, list[Any]]) -> EvalSpec:
    loc = chk.loc
    header = loc.table("eval", index)
    if not isinstance(ev, dict):
        raise chk.fail(header, "each [[eval]] must be a table")
    kind = ev.get("kind")
    if kind not in EVAL_KEYS:
        raise chk.fail(
            loc.key("eval", "kind", index), f"unknown eval kind {kind!r}", f"use one of: {', '.join(EVAL_KEYS)}"
        )
    for key in ev:
        if key not in EVAL_KEYS[kind]:
            raise chk.fail(
                loc.key("eval", key, index),
                f"unknown key '{key}' in a {kind} [[eval]]",
                f"known: {', '.join(sorted(EVAL_KEYS[kind]))}",
            )
    values: dict[str, Any] = {}
    if kind == "ppl":
        values["ctx"] = _one_int(ev.get("ctx", 512), loc.key("eval", "ctx", index), "ctx", chk, 16)
        values["chunks"] = _one_int(ev.get("chunks", 8), loc.key("eval", "chunks", index), "chunks", chk, 1)
        if "text" in ev:
            if not isinstance(ev["text"], str) or not Path(ev["text"]).expanduser().is_file():
                raise chk.fail(loc.key("eval", "text", index), f"text file {ev['text']!r} does not exist")
            values["text"] = str(Path(ev["text"]).expanduser().resolve())
        base = ev.get("kld_base")
        if base not in (None, False):
            values["kld_base"] = check_kld_base(base, loc.key("eval", "kld_base", index), chk)
        name = ev.get("name") or f"ppl(c{values['ctx']}x{values['chunks']}" + (
            f", kld vs {values['kld_base']['variant']} {values['kld_base']['cache_type_k']})"
            if "kld_base" in values
            else ")"
        )
    elif kind == "bench":
        values["prompt"] = _int_list(ev.get("prompt", [512]), loc.key("eval", "prompt", index), "prompt", chk)
        values["gen"] = _int_list(ev.get("gen", [128]), loc.key("eval", "gen", index), "gen", chk)
        values["depth"] = _int_list(ev.get("depth", [0]), loc.key("eval", "depth", index), "depth", chk)
        values["repetitions"] = _int_list(
            ev.get("repetitions", 5), loc.key("eval", "repetitions", index), "repetitions", chk, 1
        )[0]
        if not any(values["prompt"]) and not any(values["gen"]):
            raise chk.fail(header, "a bench needs a non-zero prompt or gen size")
        name = ev.get("name") or "bench(p{} n{} d{} r{})".format(
            ",".join(map(str, values["prompt"])),
            ",".join(map(str, values["gen"])),
            ",".join(map(str, values["depth"])),
            values["repetitions"],
        )
    elif kind == "decode":
        from pyharness.runners.decode import SETUPS

        samplers = ev.get("samplers", ["greedy", "chain", "sortfree-bs"])
        if not isinstance(samplers, list) or not samplers or any(x not in SETUPS for x in samplers):
            raise chk.fail(loc.key("eval", "samplers", index), f"samplers must be a list of: {', '.join(SETUPS)}")
        values = {
            "samplers": list(samplers),
            "n_gen": _one_int(ev.get("n_gen", 128), loc.key("eval", "n_gen", index), "n_gen", chk, 1),
            "repetitions": _int_list(
                ev.get("repetitions", 3), loc.key("eval", "repetitions", index), "repetitions", chk, 1
            )[0],
            "prompt": str(ev.get("prompt", "The history of the city begins")),
            "ctx": _one_int(ev.get("ctx", 1024), loc.key("eval", "ctx", index), "ctx", chk, 16),
        }
        name = ev.get("name") or "decode({} n{} r{})".format(
            ",".join(values["samplers"]), values["n_gen"], values["repetitions"]
        )
    elif kind == "sampler":
        from pyharness.sampler_bench import MODES

        modes = ev.get("modes", ["chain", "sortfree"])
        if not isinstance(modes, list) or not modes or any(m not in MODES for m in modes):
            raise chk.fail(loc.key("eval", "modes", index), f"modes must be a list of: {', '.join(MODES)}")
        values = {
            "modes": list(modes),
            "vocab": _int_list(ev.get("vocab", [151936]), loc.key("eval", "vocab", index), "vocab", chk, 2),
            "rows": _int_list(ev.get("rows", [1]), loc.key("eval", "rows", index), "rows", chk, 1),
            "iters": _one_int(ev.get("iters", 200), loc.key("eval", "iters", index), "iters", chk, 1),
            "top_k": int(ev.get("top_k", 40)),
            "backend_name": str(ev.get("backend_name", "CPU")),
            "threads": _one_int(ev.get("threads", 1), loc.key("eval", "threads", index), "threads", chk, 1),
        }
        for key, default in (("temp", 0.8), ("top_p", 0.9), ("min_p", 0.0)):
            value = ev.get(key, default)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise chk.fail(loc.key("eval", key, index), f"'{key}' must be a number")
            values[key] = float(value)
        name = ev.get("name") or "sampler({} v{} r{})".format(
            ",".join(values["modes"]), ",".join(map(str, values["vocab"])), ",".join(map(str, values["rows"]))
        )
    elif kind in PAGED_KINDS:
        values, name = check_paged_eval(kind, index, ev, chk)
    elif kind == "batched":
        values, name = check_batched_eval(index, ev, chk)
    elif kind == "retrieval":
        values, name = check_retrieval_eval(index, ev, chk)
    else:
        mode = ev.get("mode", "perf")
        if mode not in ("perf", "test"):
            raise chk.fail(loc.key("eval", "mode", index), f"test-backend-ops mode {mode!r} is not perf or test")
        values = {
            "mode": mode,
            "ops": str(ev.get("ops", "")),
            "params": str(ev.get("params", "")),
            "backend_name": str(ev.get("backend_name", "")),
        }
        name = ev.get("name") or f"ops({mode} {values['ops'] or 'all'})"
    if not isinstance(name, str):
        raise chk.fail(loc.key("eval", "name", index), "'name' must be a string")
    return EvalSpec(kind=kind, index=index, name=name, values=values)


def check_paged_eval(kind: str, index: int, ev: dict[str, Any], chk: Checker) -> tuple[dict[str, Any], Any]:
    """The values of a paged-generate or paged-server evaluation, and its name."""
    from pyharness.paged_generation import PROMPTS
    from pyharness.paged_server import MODES

    loc = chk.loc

    def one(key: str, default: int, minimum: int) -> int:
        return _one_int(ev.get(key, default), loc.key("eval", key, index), key, chk, minimum)

    prompts = ev.get("prompts", list(PROMPTS))
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise chk.fail(loc.key("eval", "prompts", index), "prompts must be a non-empty list of non-empty strings")
    values: dict[str, Any] = {"ctx": one("ctx", 2048, 64), "prompts": list(prompts)}
    if kind == "paged-generate":
        values.update(n_gen=one("n_gen", 256, 1), ubatch=one("ubatch", 512, 1), page_size=one("page_size", 64, 1))
        return values, ev.get("name") or f"paged-generate(n{values['n_gen']} x{len(prompts)} seqs)"
    modes = ev.get("modes", list(MODES))
    if not isinstance(modes, list) or not modes or any(m not in MODES for m in modes):
        raise chk.fail(loc.key("eval", "modes", index), f"modes must be a list of: {', '.join(MODES)}")
    server_args = ev.get("server_args", [])
    if not isinstance(server_args, list) or not all(isinstance(a, str) for a in server_args):
        raise chk.fail(loc.key("eval", "server_args", index), "server_args must be a list of llama-server arguments")
    values.update(
        parallel=one("parallel", 4, 1), n_predict=one("n_predict", 128, 1), repeats=one("repeats", 2, 1), modes=modes
    )
    if server_args:
        values["server_args"] = list(server_args)
    if values["parallel"] < len(prompts):
        raise chk.fail(
            loc.key("eval", "parallel", index),
            f"parallel = {values['parallel']} serves fewer requests at once than the {len(prompts)} prompts",
            "raise parallel or give fewer prompts",
        )
    name = f"paged-server(np{values['parallel']} n{values['n_predict']} x{values['repeats']})"
    return values, ev.get("name") or name


def check_batched_eval(index: int, ev: dict[str, Any], chk: Checker) -> tuple[dict[str, Any], Any]:
    """The values of a batched evaluation (llama-batched-bench), and its name."""
    loc = chk.loc
    values: dict[str, Any] = {}
    for key in ("npp", "ntg", "npl"):
        if key not in ev:
            raise chk.fail(loc.table("eval", index), f"a batched [[eval]] needs '{key}'", f"e.g. {key} = [16]")
        values[key] = _int_list(ev[key], loc.key("eval", key, index), key, chk, 1)
    pps = ev.get("pps", False)
    if not isinstance(pps, bool):
        raise chk.fail(loc.key("eval", "pps", index), f"'pps' must be true or false, got {pps!r}")
    values["pps"] = pps
    full = full_reservation(values["npp"], values["ntg"], values["npl"])
    values["ctx"] = _one_int(ev.get("ctx", full), loc.key("eval", "ctx", index), "ctx", chk, 16)
    name = "batched(pp{} tg{} pl{}{} c{})".format(
        ",".join(map(str, values["npp"])),
        ",".join(map(str, values["ntg"])),
        ",".join(map(str, values["npl"])),
        " pps" if pps else "",
        values["ctx"],
    )
    return values, ev.get("name") or name


def _number_list(value: Any, line: int, key: str, chk: Checker, ok: Callable[[float], bool], what: str) -> list[float]:
    values = _as_list(value)
    if not values or not all(isinstance(v, int | float) and not isinstance(v, bool) and ok(v) for v in values):
        raise chk.fail(line, f"'{key}' must be {what}, or a non-empty list of them, got {value!r}")
    return [float(v) for v in values]


def check_retrieval_eval(index: int, ev: dict[str, Any], chk: Checker) -> tuple[dict[str, Any], Any]:
    """The values of a retrieval evaluation (llama-needle), and its name."""
    from pyharness.runners.retrieval import DEFAULT_DEPTHS, DEFAULT_RATES, METHODS, MIN_LENGTH, default_ctx

    loc = chk.loc

    def line(key: str) -> int:
        return loc.key("eval", key, index)

    lengths = _int_list(ev.get("lengths", [4096]), line("lengths"), "lengths", chk, MIN_LENGTH)
    values: dict[str, Any] = {"lengths": list(dict.fromkeys(lengths))}
    values["depths"] = list(
        dict.fromkeys(
            _number_list(
                ev.get("depths", list(DEFAULT_DEPTHS)),
                line("depths"),
                "depths",
                chk,
                lambda d: 0 < d < 1,
                "a number strictly between 0 and 1",
            )
        )
    )
    values["trials"] = _one_int(ev.get("trials", 50), line("trials"), "trials", chk, 1)
    values["keys"] = _one_int(ev.get("keys", 1), line("keys"), "keys", chk, 1)
    methods = ev.get("methods", list(METHODS))
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) and m in METHODS for m in methods):
        raise chk.fail(line("methods"), f"'methods' must be a non-empty list of: {', '.join(METHODS)}; got {methods!r}")
    values["methods"] = list(dict.fromkeys(methods))
    values["rates"] = list(
        dict.fromkeys(
            _number_list(
                ev.get("rates", list(DEFAULT_RATES)), line("rates"), "rates", chk, lambda r: r >= 1, "a number >= 1"
            )
        )
    )
    longest = max(values["lengths"])
    values["ctx"] = _one_int(ev.get("ctx", default_ctx(values["lengths"])), line("ctx"), "ctx", chk, 16)
    if values["ctx"] <= longest:
        raise chk.fail(
            line("ctx"),
            f"ctx = {values['ctx']} does not hold a prompt of {longest} tokens",
            f"leave ctx out (default {default_ctx(values['lengths'])}: the prompt and its copy share a pool)",
        )
    if "text" in ev:
        if not isinstance(ev["text"], str) or not Path(ev["text"]).expanduser().is_file():
            raise chk.fail(line("text"), f"text file {ev['text']!r} does not exist")
        values["text"] = str(Path(ev["text"]).expanduser().resolve())
    compressed = [m for m in values["methods"] if m != "full"]
    name = "retrieval(L{} d{} x{} k{}{} c{})".format(
        ",".join(map(str, values["lengths"])),
        len(values["depths"]),
        values["trials"],
        values["keys"],
        (" " + ",".join(compressed) + " R" + ",".join(f"{r:g}" for r in values["rates"])) if compressed else " full",
        values["ctx"],
    )
    return values, ev.get("name") or name


def check_own_args(cell: Cell, chk: Checker, own_args: Iterable[str], kind: str, hint: str) -> None:
    """[flags] extra goes to the tool after the eval's own arguments: it must not set them again."""
    own = [a for a in cell.flags["extra"] if a in own_args]
    if own:
        raise chk.fail(
            chk.loc.key("flags", "extra"),
            f"extra arguments {' '.join(own)} are the {kind} evaluation's own (cell {cell.label()})",
            hint,
        )


def check_retrieval_cell(cell: Cell, chk: Checker) -> None:
    """llama-needle exists in the patched build only; [flags] extra goes to it after the eval's own arguments and
    must neither set them again nor put compression on a schedule of its own."""
    loc = chk.loc
    if cell.variant != "patched":
        raise chk.fail(
            loc.table("eval", cell.ev.index),
            f"retrieval needs the patched variant (cell {cell.label()}): llama-needle is a tool of the patch "
            "series (kv-compress), upstream has none",
            'use variants = ["patched"] or exclude the upstream cells with [[exclude]]',
        )
    check_own_args(
        cell,
        chk,
        RETRIEVAL_OWN_ARGS,
        "retrieval",
        "set lengths, depths, trials, keys, methods, rates, ctx and text in the [[eval]]",
    )
    schedule = [a for a in cell.flags["extra"] if a in SCHEDULE_ARGS]
    if schedule:
        raise chk.fail(
            loc.key("flags", "extra"),
            f"extra arguments {' '.join(schedule)} would compress on a schedule of their own (cell {cell.label()}): "
            "llama-needle compresses each configuration itself",
            "set methods and rates in the [[eval]]; --kv-compress-window, -sink and -obs may stay in extra",
        )


def check_batched_cell(cell: Cell, chk: Checker) -> None:
    """[flags] extra goes to llama-batched-bench after the eval's own arguments: it must not set them again, and
    upstream has no paged cache options."""
    loc = chk.loc
    check_own_args(cell, chk, BATCHED_OWN_ARGS, "batched", "set npp, ntg, npl, pps and ctx in the [[eval]]")
    paged = [a for a in cell.flags["extra"] if a in PAGED_ARGS]
    if paged and cell.variant != "patched":
        raise chk.fail(
            loc.key("flags", "extra"),
            f"{' '.join(paged)} on the {cell.variant} variant (cell {cell.label()}): only the patched build has the "
            "paged KV cache",
            "exclude these cells with [[exclude]] variant/extra",
        )


def check_kld_base(base: Any, line: int, chk: Checker) -> dict[str, Any]:
    if not isinstance(base, dict):
        raise chk.fail(line, 'kld_base must be a table, e.g. { variant = "upstream", kv = "f16" }')
    for key in base:
        if key not in KLD_BASE_KEYS:
            raise chk.fail(line, f"unknown key '{key}' in kld_base", f"known: {', '.join(sorted(KLD_BASE_KEYS))}")
    variant = base.get("variant", "upstream")
    if variant not in VARIANTS:
        raise chk.fail(line, f"unknown variant '{variant}' in kld_base", f"choose from: {', '.join(VARIANTS)}")
    backend = base.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise chk.fail(line, f"unknown backend '{backend}' in kld_base", f"choose from: {', '.join(BACKENDS)}")
    if "kv" in base and ({"cache_type_k", "cache_type_v"} & set(base)):
        raise chk.fail(line, "contradictory flags in kld_base: kv and cache_type_k/cache_type_v")
    k = base.get("kv", base.get("cache_type_k", "f16"))
    v = base.get("kv", base.get("cache_type_v", "f16"))
    for t in (k, v):
        if t not in KV_TYPES:
            raise chk.fail(line, f"unknown KV cache type '{t}' in kld_base", f"use one of: {', '.join(KV_TYPES)}")
    fa = base.get("flash_attn")
    if fa is not None:
        try:
            fa = normalize_fa(fa)
        except HarnessError as exc:
            raise chk.fail(line, exc.problem) from exc
    if v not in UNQUANTIZED_KV and fa == "off":
        raise chk.fail(line, f"contradictory flags in kld_base: a {v} V cache needs flash attention")
    extra = base.get("extra", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise chk.fail(line, "kld_base extra must be a list of strings")
    return {
        "variant": variant,
        "backend": backend,
        "cache_type_k": k,
        "cache_type_v": v,
        "flash_attn": fa,
        "extra": extra,
    }


def check_cell(cell: Cell, chk: Checker) -> None:
    loc = chk.loc
    v, fa = cell.flags["cache_type_v"], cell.flags["flash_attn"]
    if cell.ev.kind not in MODEL_FREE_KINDS and v not in UNQUANTIZED_KV and fa == "off":
        line = loc.key("flags", "flash_attn")
        raise chk.fail(
            line,
            f"contradictory flags: a {v} V cache needs flash attention, but flash_attn is off (cell {cell.label()})",
            'use flash_attn = "on" or exclude the cell with [[exclude]]',
        )
    if (
        fa == "int8"
        and cell.ev.kind not in MODEL_FREE_KINDS
        and (v != "q8_kv" or cell.flags["cache_type_k"] != "q8_kv")
    ):
        raise chk.fail(
            loc.key("flags", "flash_attn"),
            f"contradictory flags: flash_attn = int8 needs a q8_kv K and V cache, not "
            f"{cell.flags['cache_type_k']}/{v} (cell {cell.label()})",
            'use kv = "q8_kv" with flash_attn = "int8", or exclude the cell with [[exclude]]',
        )
    if cell.ev.kind in PAGED_KINDS:
        check_paged_cell(cell, chk)
    if cell.ev.kind == "batched":
        check_batched_cell(cell, chk)
    if cell.ev.kind == "retrieval":
        check_retrieval_cell(cell, chk)
    if cell.flags.get("n_gpu_layers") and cell.backend == "cpu" and cell.ev.kind not in MODEL_FREE_KINDS:
        raise chk.fail(
            loc.key("flags", "n_gpu_layers"),
            f"contradictory flags: n_gpu_layers = {cell.flags['n_gpu_layers']} on the cpu backend "
            f"(cell {cell.label()})",
            "exclude backend cpu for it, or drop n_gpu_layers",
        )


def check_paged_cell(cell: Cell, chk: Checker) -> None:
    """The paged evaluations compare the patched build's two f16 caches inside one run."""
    loc = chk.loc
    if cell.variant != "patched":
        raise chk.fail(
            loc.table("eval", cell.ev.index),
            f"{cell.ev.kind} needs the patched variant (cell {cell.label()}): upstream has no paged cache",
            'use variants = ["patched"] or exclude the upstream cells with [[exclude]]',
        )
    if cell.flags["cache_type_k"] != "f16" or cell.flags["cache_type_v"] != "f16":
        raise chk.fail(
            loc.key("flags", "kv"), f"{cell.ev.kind} runs f16 caches (cell {cell.label()})", 'use kv = "f16"'
        )
    if cell.flags["flash_attn"] == "int8":
        raise chk.fail(loc.key("flags", "flash_attn"), f"{cell.ev.kind} takes flash_attn on, off or auto")
    if cell.ev.kind == "paged-generate" and cell.flags["extra"]:
        raise chk.fail(
            loc.key("flags", "extra"),
            f"paged-generate runs in-process and takes no tool arguments (cell {cell.label()})",
            "drop [flags] extra, or exclude these cells for the extra arguments",
        )


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Planned:
    cell: Cell
    ctx: RunContext | None  # None: its build failed
    config_hash: str
    existing: int | None = None
    build_error: str = ""


@dataclass
class MatrixResult:
    ran: int = 0
    ok: int = 0
    failed: list[tuple[str, int, str]] = field(default_factory=list)  # (label, run id, error)
    skipped: int = 0
    seconds: float = 0.0
    # where an executor knows them: seconds before its first cell was submitted (connecting, surveying nodes) and
    # from then until its last cell's result
    setup_seconds: float | None = None
    cells_seconds: float | None = None


Builder = Callable[[str, str], BuildInfo]


def default_builder(no_build: bool, root: Path | None) -> Builder:
    def build_one(variant: str, backend: str) -> BuildInfo:
        if no_build:
            from pyharness.build import load_build

            return load_build(variant, backend, root)
        from pyharness.build import build

        return build(variant, backend, root=root)

    return build_one


def cell_text(cell: Cell, text: str | None) -> Path:
    from pyharness.text import resolve_text

    return resolve_text(cell.ev.values.get("text") or text)


def kld_base_of(cell: Cell) -> KldBase | None:
    base = cell.ev.values.get("kld_base")
    if not base:
        return None
    return KldBase(
        variant=base["variant"],
        backend=base["backend"],
        cache_type_k=base["cache_type_k"],
        cache_type_v=base["cache_type_v"],
        flash_attn=base["flash_attn"],
        extra=tuple(base["extra"]),
    )


def ppl_params(cell: Cell) -> PplParams:
    f = cell.flags
    return PplParams(
        ctx=cell.ev.values["ctx"],
        chunks=cell.ev.values["chunks"],
        batch=f.get("batch"),
        ubatch=f.get("ubatch"),
        threads=f.get("threads"),
        cache_type_k=f["cache_type_k"],
        cache_type_v=f["cache_type_v"],
        flash_attn=f["flash_attn"],
        n_gpu_layers=f.get("n_gpu_layers"),
        extra=tuple(f["extra"]),
    ).validate()


def bench_params(cell: Cell) -> BenchParams:
    f, ev = cell.flags, cell.ev.values

    def one(key: str) -> tuple[int, ...]:
        return (f[key],) if f.get(key) is not None else ()

    return BenchParams(
        n_prompt=tuple(ev["prompt"]),
        n_gen=tuple(ev["gen"]),
        depth=tuple(ev["depth"]),
        cache_type_k=(f["cache_type_k"],),
        cache_type_v=(f["cache_type_v"],),
        flash_attn=(f["flash_attn"],),
        repetitions=ev["repetitions"],
        n_gpu_layers=one("n_gpu_layers"),
        threads=one("threads"),
        batch=one("batch"),
        ubatch=one("ubatch"),
        extra=tuple(f["extra"]),
    ).validate()


def ops_params(cell: Cell) -> OpsParams:
    ev = cell.ev.values
    return OpsParams(mode=ev["mode"], ops=ev["ops"], params_regex=ev["params"], backend_name=ev["backend_name"])


NO_MODEL = ModelRef(name="", path=Path("/dev/null"), sha256="", size=0)


def decode_params(cell: Cell) -> DecodeParams:
    f = cell.flags
    return DecodeParams(**cell.ev.values, threads=f.get("threads"), n_gpu_layers=f.get("n_gpu_layers"))


def sampler_params(cell: Cell) -> SamplerBenchParams:
    return SamplerBenchParams(**cell.ev.values)


def paged_generate_params(cell: Cell) -> PagedGenerateParams:
    return PagedGenerateParams(**cell.ev.values, threads=cell.flags.get("threads"), flash_attn=cell.flags["flash_attn"])


def paged_server_params(cell: Cell) -> PagedServerParams:
    """The eval's values, with [flags] extra and then the eval's own server_args as the servers' extra arguments."""
    f = cell.flags
    values = {k: v for k, v in cell.ev.values.items() if k != "server_args"}
    extra = [*f["extra"], *cell.ev.values.get("server_args", [])]
    return PagedServerParams(**values, threads=f.get("threads"), flash_attn=f["flash_attn"], extra=extra)


def tool_flags(f: dict[str, Any]) -> dict[str, Any]:
    """A cell's [flags] as the keyword arguments of the batched and retrieval runners' parameters."""
    return {
        "cache_type_k": f["cache_type_k"],
        "cache_type_v": f["cache_type_v"],
        "flash_attn": f["flash_attn"],
        "threads": f.get("threads"),
        "batch": f.get("batch"),
        "ubatch": f.get("ubatch"),
        "n_gpu_layers": f.get("n_gpu_layers"),
        "extra": list(f["extra"]),
    }


def batched_params(cell: Cell) -> BatchedParams:
    f, ev = cell.flags, cell.ev.values
    return BatchedParams(
        npp=list(ev["npp"]),
        ntg=list(ev["ntg"]),
        npl=list(ev["npl"]),
        pps=ev["pps"],
        ctx=ev["ctx"],
        **tool_flags(f),
    ).validate()


def retrieval_params(cell: Cell) -> RetrievalParams:
    f, ev = cell.flags, cell.ev.values
    return RetrievalParams(
        lengths=list(ev["lengths"]),
        depths=list(ev["depths"]),
        trials=ev["trials"],
        keys=ev["keys"],
        methods=list(ev["methods"]),
        rates=list(ev["rates"]),
        ctx=ev["ctx"],
        **tool_flags(f),
    ).validate()


# evaluations that read the evaluation text (the eval's `text`, else --text / $PYHARNESS_TEXT / the cache)
TEXT_KINDS = ("ppl", "retrieval")


def cell_config(cell: Cell, ctx: RunContext, text: str | None, root: Path | None) -> str:
    if cell.ev.kind == "retrieval":
        return retrieval_config(ctx, retrieval_params(cell), cell_text(cell, text))[0]
    if cell.ev.kind == "ppl":
        req = PplRequest(params=ppl_params(cell), text=cell_text(cell, text), kld=kld_base_of(cell), root=root)
        return ppl_config(ctx, req)[0]
    if cell.ev.kind == "bench":
        return bench_config(ctx, bench_params(cell))[0]
    if cell.ev.kind == "batched":
        return batched_config(ctx, batched_params(cell))[0]
    if cell.ev.kind == "decode":
        from pyharness.runners import config_hash as decode_hash

        return decode_hash("decode", ctx.build, ctx.host, ctx.model, decode_params(cell).__dict__)
    from pyharness.runners import config_hash

    if cell.ev.kind == "paged-generate":
        return config_hash(cell.ev.kind, ctx.build, ctx.host, ctx.model, asdict(paged_generate_params(cell)))
    if cell.ev.kind == "paged-server":
        return config_hash(cell.ev.kind, ctx.build, ctx.host, ctx.model, asdict(paged_server_params(cell)))
    if cell.ev.kind == "sampler":
        return config_hash("sampler", ctx.build, ctx.host, NO_MODEL, sampler_params(cell).__dict__)
    return config_hash("ops", ctx.build, ctx.host, NO_MODEL, ops_params(cell).__dict__)


def run_cell(cell: Cell, ctx: RunContext, text: str | None, root: Path | None) -> RunRecord:
    if cell.ev.kind == "ppl":
        req = PplRequest(params=ppl_params(cell), text=cell_text(cell, text), kld=kld_base_of(cell), root=root)
        return run_perplexity(ctx, req)
    if cell.ev.kind == "bench":
        return run_bench(ctx, bench_params(cell))
    if cell.ev.kind == "batched":
        return run_batched(ctx, batched_params(cell))
    if cell.ev.kind == "retrieval":
        return run_retrieval(ctx, retrieval_params(cell), cell_text(cell, text))
    if cell.ev.kind == "sampler":
        return run_sampler_bench(ctx, sampler_params(cell))
    if cell.ev.kind == "decode":
        return run_decode(ctx, decode_params(cell))
    if cell.ev.kind == "paged-generate":
        return run_paged_generation(ctx, paged_generate_params(cell))
    if cell.ev.kind == "paged-server":
        return run_paged_server(ctx, paged_server_params(cell))
    return run_backend_ops(ctx, ops_params(cell))


def failed_build_record(cell: Cell, spec: MatrixSpec, error: str, chash: str) -> RunRecord:
    from pyharness.host import host_info

    h = host_info()
    now = now_utc()
    return RunRecord(
        fields={
            "kind": cell.ev.kind,
            "status": "failed",
            "error": error,
            "config_hash": chash,
            "config": cell.key(),
            "params": cell.key(),
            "matrix": spec.name,
            "cell": cell.label(),
            "variant": cell.variant,
            "backend": cell.backend,
            "model_name": cell.model,
            "host_name": h.hostname,
            "host_cpu": h.cpu,
            "host_cpu_count": h.cpu_count,
            "host_os": h.os,
            "gpu_name": h.gpu_name,
            "gpu_driver": h.gpu_driver,
            "cuda_version": h.cuda_version,
            "started_at": now,
            "finished_at": now,
        }
    )


def placeholder_hash(prefix: str, cell: Cell) -> str:
    """The configuration hash a cell is stored under when it never got a configuration (no build, no model, lost)."""
    return f"{prefix}-" + hashlib.sha256(canonical(cell.key()).encode()).hexdigest()[:12]


def record_outcome(
    store: Store, result: MatrixResult, label: str, record: RunRecord, say: Callable[[str], None]
) -> int:
    """Write one finished run (one transaction) and count it; a failure is also said."""
    run_id = store.record(record)
    result.ran += 1
    if record.ok:
        result.ok += 1
    else:
        result.failed.append((label, run_id, str(record.fields.get("error"))))
        say(f"FAILED {label}: {record.fields.get('error')} (run {run_id})")
    return run_id


def plan(
    spec: MatrixSpec,
    store: Store,
    *,
    builder: Builder,
    text: str | None = None,
    root: Path | None = None,
    echo: bool = False,
    dry_run: bool = False,
) -> list[Planned]:
    """Build what the cells need, resolve models and texts, and hash every cell's configuration.

    A dry run writes nothing: a synthetic model that is not generated yet stays unresolved (its cells are listed
    as to run) instead of being written.
    """
    cells = spec.cells()
    models: dict[str, ModelRef] = {}
    unresolved: dict[str, str] = {}
    for name in spec.models:
        if any(c.model == name and c.ev.kind not in MODEL_FREE_KINDS for c in cells):
            if dry_run and name.startswith(SYNTH_PREFIX) and not synth_path(name).is_file():
                check_synth(name)
                unresolved[name] = f"to run; {name} is generated on the first real run"
                continue
            try:
                models[name] = resolve_model(name)
            except HarnessError as exc:
                raise MatrixError(
                    f"{spec.path}:{spec.model_lines.get(name, 1)}: model '{name}' does not resolve: {exc.problem}",
                    exc.fix,
                ) from exc
    for cell in cells:
        if cell.ev.kind in TEXT_KINDS:
            try:
                cell_text(cell, text)
            except HarnessError as exc:
                line = spec.loc.key("eval", "text", cell.ev.index)
                raise MatrixError(f"{spec.path}:{line}: {exc.problem}", exc.fix) from exc
    needed: list[tuple[str, str]] = []
    for cell in cells:
        pairs = [(cell.variant, cell.backend)]
        base = kld_base_of(cell)
        if base:
            pairs.append((base.variant, base.backend or cell.backend))
        for pair in pairs:
            if pair not in needed:
                needed.append(pair)
    builds: dict[tuple[str, str], BuildInfo | str] = {}
    for variant, backend in needed:
        try:
            builds[(variant, backend)] = builder(variant, backend)
        except HarnessError as exc:
            builds[(variant, backend)] = str(exc)
            print(f"pyharness: build {variant}-{backend} failed: {exc}", file=sys.stderr)
    planned: list[Planned] = []
    for cell in cells:
        info = builds[(cell.variant, cell.backend)]
        if cell.ev.kind not in MODEL_FREE_KINDS and cell.model in unresolved:
            chash = placeholder_hash("unresolved", cell)
            planned.append(Planned(cell, None, chash, build_error=unresolved[cell.model]))
            continue
        base = kld_base_of(cell)
        base_info = builds[(base.variant, base.backend or cell.backend)] if base else None
        if isinstance(info, str) or isinstance(base_info, str):
            error = f"build failed: {info if isinstance(info, str) else base_info}"
            chash = placeholder_hash("unbuilt", cell)
            planned.append(Planned(cell, None, chash, build_error=error))
            continue
        model = models[cell.model] if cell.ev.kind not in MODEL_FREE_KINDS else NO_MODEL
        ctx = RunContext(
            build=info, model=model, matrix=spec.name, cell=cell.label(), timeout_s=spec.timeout, echo=echo
        )
        chash = cell_config(cell, ctx, text, root)
        planned.append(Planned(cell, ctx, chash, existing=store.find_ok(chash)))
    return planned


def run_matrix(
    spec: MatrixSpec,
    store: Store,
    *,
    builder: Builder,
    text: str | None = None,
    root: Path | None = None,
    retry_failed: bool = True,
    dry_run: bool = False,
    echo: bool = False,
    progress: bool = True,
) -> MatrixResult:
    """Run every cell whose configuration is not stored yet; failures are recorded and the matrix goes on."""
    t0 = time.monotonic()
    planned = plan(spec, store, builder=builder, text=text, root=root, echo=echo, dry_run=dry_run)
    todo: list[Planned] = []
    result = MatrixResult()
    for p in planned:
        if p.existing is not None:
            result.skipped += 1
            continue
        if not retry_failed:
            prior = store.find_any(p.config_hash)
            if prior is not None and prior["status"] == "failed":
                result.skipped += 1
                continue
        todo.append(p)
    print(
        f"matrix {spec.name}: {len(planned)} cells, {result.skipped} already stored, {len(todo)} to run",
        file=sys.stderr,
    )
    if dry_run:
        for p in planned:
            state = f"stored as run {p.existing}" if p.existing is not None else (p.build_error or "to run")
            print(f"  {p.config_hash}  {p.cell.label()}  [{state}]")
        return result
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="run", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        for p in todo:
            bar.set_postfix_str(p.cell.label()[:60], refresh=True)
            if p.ctx is None:
                record = failed_build_record(p.cell, spec, p.build_error, p.config_hash)
            else:
                try:
                    record = run_cell(p.cell, p.ctx, text, root)
                except HarnessError as exc:
                    record = failed_build_record(p.cell, spec, str(exc), p.config_hash)
            record_outcome(store, result, p.cell.label(), record, bar.write)
            bar.update(1)
    finally:
        bar.close()
    result.seconds = round(time.monotonic() - t0, 1)
    return result
