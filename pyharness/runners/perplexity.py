"""`pyharness ppl`: llama-perplexity of a built variant, with KL divergence against a cached base run.

A plain run prints `Final estimate: PPL = X +/- Y`. With a KLD base, the base variant (upstream, f16 KV cache by
default) first runs once with `--kl-divergence-base FILE` to save its logits; the file is kept under
`<cache>/kld-base/<key>/`, keyed by model sha256, text sha256, context, chunks, batch, and the base build and KV
configuration, and reused by every later run. The evaluated run then reads it with `--kl-divergence` and prints the
"Perplexity", "KL divergence" and "Token probability" statistics blocks, all of which are parsed and stored.

llama-perplexity exits 0 in several failure cases (text too short, unreadable logits file, fewer than 100 scored
tokens for KLD statistics), so a run is 'ok' only when its exit code is 0 *and* every expected number was parsed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pyharness import paths
from pyharness.build import BuildInfo, build_id, load_build
from pyharness.errors import HarnessError
from pyharness.file_lock import file_lock
from pyharness.runners import (
    Execution,
    ModelRef,
    RunContext,
    cache_and_run_args,
    canonical,
    config_hash,
    execute,
    provenance_fields,
    tool_env,
)
from pyharness.store import KLD_STAT_COLUMNS, RunRecord
from pyharness.text import cached_sha256

FLASH_ATTN_MODES = ("on", "off", "auto")
# KV cache types llama.cpp accepts for -ctk/-ctv (common/arg.cpp kv_cache_types); q8_kv only in patched builds
# with the int8-flash-attn feature (an upstream build rejects it: exclude such cells from a matrix)
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q8_kv", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
UNQUANTIZED_KV = ("f32", "f16", "bf16")

NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|-?inf)"


class ParseError(ValueError):
    """The output lacks numbers a successful run prints."""


def normalize_fa(value: object) -> str:
    """on/off/auto/int8 from the spellings llama.cpp accepts (and TOML booleans)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    if text in ("on", "enabled", "true", "1"):
        return "on"
    if text in ("off", "disabled", "false", "0"):
        return "off"
    if text in ("auto", "-1"):
        return "auto"
    if text in ("int8", "2"):
        return "int8"
    raise HarnessError(f"flash attention mode {value!r} is not on, off, auto or int8")


def check_kv_type(value: str, what: str = "KV cache type") -> str:
    if value not in KV_TYPES:
        raise HarnessError(f"unknown {what} {value!r}", f"use one of: {', '.join(KV_TYPES)}")
    return value


INT8_ATTN_KV = "q8_kv"


def check_kv_fa(cache_type_v: str, flash_attn: str, cache_type_k: str | None = None) -> None:
    """llama.cpp refuses a quantized V cache without flash attention; int8 attention runs with a q8_kv K and V cache
    only (with other types llama.cpp falls back to plain flash attention, which would be stored as int8)."""
    if cache_type_v not in UNQUANTIZED_KV and flash_attn == "off":
        raise HarnessError(
            f"a {cache_type_v} V cache needs flash attention, but flash_attn is off",
            "use flash_attn = on (or auto), or an f16 V cache",
        )
    if flash_attn == "int8" and (cache_type_v != INT8_ATTN_KV or cache_type_k not in (None, INT8_ATTN_KV)):
        raise HarnessError(
            f"flash_attn = int8 needs a {INT8_ATTN_KV} K and V cache, not {cache_type_k or '?'}/{cache_type_v}",
            f"use kv = {INT8_ATTN_KV} with flash_attn = int8",
        )


@dataclass(frozen=True)
class PplParams:
    """Every llama-perplexity setting a run depends on."""

    ctx: int = 512
    chunks: int = 8
    batch: int | None = None
    ubatch: int | None = None
    threads: int | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    n_gpu_layers: int | None = None
    extra: tuple[str, ...] = ()

    def validate(self) -> PplParams:
        if self.ctx < 16:
            raise HarnessError(f"context {self.ctx} is too small", "use -c 128 or more")
        if self.chunks < 1:
            raise HarnessError(f"chunks must be at least 1, got {self.chunks}")
        check_kv_type(self.cache_type_k, "K cache type")
        check_kv_type(self.cache_type_v, "V cache type")
        fa = normalize_fa(self.flash_attn)
        check_kv_fa(self.cache_type_v, fa, self.cache_type_k)
        return replace(self, flash_attn=fa, extra=tuple(self.extra))

    def args(self) -> list[str]:
        out = [
            "-c",
            str(self.ctx),
            "--chunks",
            str(self.chunks),
            *cache_and_run_args(self),
        ]
        # info-level logs: llama.cpp's own KV cache size line (kv_mib), about 13 KB of stderr
        out += ["-lv", "4"]
        return out + list(self.extra)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra"] = list(self.extra)
        return d

    def identity(self) -> dict[str, Any]:
        """What the numbers depend on (threads only change speed, so they are left out)."""
        d = self.as_dict()
        d.pop("threads")
        return d


@dataclass(frozen=True)
class KldBase:
    """The run whose logits KLD is measured against: by default upstream with an f16 KV cache."""

    variant: str = "upstream"
    backend: str | None = None  # None: the evaluated run's backend
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str | None = None  # None: the evaluated run's mode (int8 attention: on, the base has no int8 cache)
    extra: tuple[str, ...] = ()

    def params_for(self, run: PplParams) -> PplParams:
        return replace(
            run,
            cache_type_k=self.cache_type_k,
            cache_type_v=self.cache_type_v,
            flash_attn=self.flash_attn or ("on" if run.flash_attn == "int8" else run.flash_attn),
            extra=tuple(self.extra),
        ).validate()


# ------------------------------------------------------------------------------------------------ parsing

FINAL_RE = re.compile(rf"Final estimate: PPL = ({NUM}) \+/- ({NUM})")
_PM = rf"\s*:\s*({NUM})\s*±\s*({NUM})"
KLD_PATTERNS: tuple[tuple[str, str, str | None], ...] = (
    (r"Mean PPL\(Q\)" + _PM, "ppl", "ppl_err"),
    (r"Mean PPL\(base\)" + _PM, "ppl_base", "ppl_base_err"),
    (rf"Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\)\s*:\s*({NUM})%", "cor_ln_ppl_pct", None),
    (r"Mean ln\(PPL\(Q\)/PPL\(base\)\)" + _PM, "ln_ppl_ratio", "ln_ppl_ratio_err"),
    (r"Mean PPL\(Q\)/PPL\(base\)" + _PM, "ppl_ratio", "ppl_ratio_err"),
    (r"Mean PPL\(Q\)-PPL\(base\)" + _PM, "ppl_diff", "ppl_diff_err"),
    (r"Mean\s+KLD" + _PM, "kld_mean", "kld_mean_err"),
    (r"Mean\s+Δp" + _PM + r"\s*%", "dp_mean_pct", "dp_mean_err_pct"),
    (r"RMS Δp" + _PM + r"\s*%", "dp_rms_pct", "dp_rms_err_pct"),
    (r"Same top p" + _PM + r"\s*%", "same_top_pct", "same_top_err_pct"),
)
QUANTILE_RE = re.compile(rf"^\s*(Maximum|Median|Minimum|[\d.]+%)\s+(KLD|Δp)\s*:\s*({NUM})%?\s*$", re.MULTILINE)


def _float(text: str) -> float:
    return float(text)


def _quantile_name(label: str, stat: str) -> str:
    prefix = "kld" if stat == "KLD" else "dp"
    suffix = "" if stat == "KLD" else "_pct"
    if label in ("Maximum", "Median", "Minimum"):
        key = {"Maximum": "max", "Median": "median", "Minimum": "min"}[label]
    else:
        number = f"{float(label.rstrip('%')):g}"
        key = "p" + number.replace(".", "_")
    return f"{prefix}_{key}{suffix}"


def parse_final_estimate(output: str) -> dict[str, float]:
    """{'ppl', 'ppl_err'} from a plain llama-perplexity run (the line is in its stderr log)."""
    matches = FINAL_RE.findall(output)
    if not matches:
        raise ParseError("llama-perplexity printed no 'Final estimate' line" + _why(output))
    ppl, err = matches[-1]
    return {"ppl": _float(ppl), "ppl_err": _float(err)}


def parse_kld(output: str) -> dict[str, float]:
    """Every statistic of llama-perplexity --kl-divergence (names are the `kld` table's columns, plus ppl/ppl_err)."""
    start = output.find("====== Perplexity statistics ======")
    if start < 0:
        raise ParseError(
            "llama-perplexity printed no KL-divergence statistics (it prints them only for 100 or more "
            "scored tokens: use a larger -c or --chunks)" + _why(output)
        )
    block = output[start:]
    found: dict[str, float] = {}
    for pattern, name, err_name in KLD_PATTERNS:
        match = re.search(pattern, block)
        if not match:
            continue
        found[name] = _float(match.group(1))
        if err_name:
            found[err_name] = _float(match.group(2))
    for label, stat, value in QUANTILE_RE.findall(block):
        found[_quantile_name(label, stat)] = _float(value)
    missing = [c for c in ("ppl", "ppl_err", *KLD_STAT_COLUMNS) if c not in found]
    if missing:
        raise ParseError(f"KL-divergence statistics lack {', '.join(missing)} (has llama-perplexity's output changed?)")
    return found


# llama_kv_cache: size =   46.41 MiB (   256 cells,  30 layers, 16/16 seqs), K (q8_kv):   23.20 MiB, V (q8_kv): ...
# llama_kv_cache_paged: size =   45.70 MiB (    96 pages of 64 slots,  30 layers,  4 seqs), K (f16): ... (the paged
# cache: its pools, positions included)
KV_SIZE_RE = re.compile(r"llama_kv_cache(?:_paged)?: size =\s*(" + NUM + r") MiB \(")


def parse_kv_mib(output: str) -> float | None:
    """llama.cpp's own KV cache size in MiB, summed over the caches its context creates (models with sliding-window
    layers have two); None where the log does not show it."""
    sizes = [_float(m) for m in KV_SIZE_RE.findall(output)]
    return sum(sizes) if sizes else None


# llama_kv_cache_paged::memory_breakdown (llama-perplexity prints the memory breakdown at exit):
# memory_breakdown: paged KV cache: 96 of 384 pages in use (11.42 of 45.70 MiB, 30 layers, pages of 64 slots)
KV_USED_RE = re.compile(r"paged KV cache: \d+ of \d+ pages in use \((" + NUM + r") of " + NUM + r" MiB")
# memory_breakdown: paged KV cache: observed queries 8.44 MiB (512 per sequence) (KV-Compress's rings, held whole)
KV_OBS_RE = re.compile(r"paged KV cache: observed queries (" + NUM + r") MiB")


def parse_kv_used_mib(output: str) -> float | None:
    """The paged cache's MiB in use as it last logged them (at exit: the last chunk's pages, a compressed cache's
    after its last compression and the tokens since), plus KV-Compress's rings of observed queries where the cache
    keeps them (memory the compression costs), or None (the standard cache logs no such line)."""
    found = KV_USED_RE.findall(output)
    if not found:
        return None
    obs = KV_OBS_RE.findall(output)
    return _float(found[-1]) + (_float(obs[-1]) if obs else 0.0)


def _why(output: str) -> str:
    for line in output.splitlines():
        low = line.lower()
        if ("error" in low or "failed" in low or "you need" in low or " E " in line) and line.strip():
            return f": {line.strip()}"
    return ""


def parse_perplexity_output(stdout: str, stderr: str, *, kld: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(perplexity row, kld row or None) from a finished run's two streams."""
    combined = f"{stdout}\n{stderr}"
    memory = {"kv_mib": parse_kv_mib(combined), "kv_used_mib": parse_kv_used_mib(combined)}
    if kld:
        stats = parse_kld(stdout if "====== Perplexity statistics" in stdout else combined)
        ppl = {"ppl": stats.pop("ppl"), "ppl_err": stats.pop("ppl_err"), "source": "kld_statistics", **memory}
        return ppl, stats
    final = parse_final_estimate(combined)
    return {**final, "source": "final_estimate", **memory}, None


# ------------------------------------------------------------------------------------------------ KLD base cache


@dataclass
class BaseLogits:
    key: str
    path: Path
    meta: dict[str, Any]


def kld_base_key(model: ModelRef, text_sha256: str, base_build: BuildInfo, params: PplParams) -> str:
    ident = {
        "model_sha256": model.sha256,
        "text_sha256": text_sha256,
        "variant": base_build.variant,
        "backend": base_build.backend,
        "build": build_id(base_build),
        "params": params.identity(),
    }
    return hashlib.sha256(canonical(ident).encode()).hexdigest()[:20]


def kld_cache_root() -> Path:
    return paths.cache_dir() / "kld-base"


class KldBaseError(HarnessError):
    """The base run failed; `execution` holds its output for the failed run's log."""

    def __init__(self, problem: str, execution: Execution | None = None) -> None:
        super().__init__(problem, "see the run's stored stderr, or run the base configuration with `pyharness ppl`")
        self.execution = execution


def base_logits(
    model: ModelRef,
    text: Path,
    run_backend: str,
    run_params: PplParams,
    base: KldBase,
    *,
    root: Path | None = None,
    echo: bool = False,
    timeout_s: float | None = None,
) -> BaseLogits:
    """The cached base logits for this configuration, computing them (once, under a lock) when missing."""
    base_build = load_build(base.variant, base.backend or run_backend, root)
    params = base.params_for(run_params)
    text_sha = cached_sha256(text)
    key = kld_base_key(model, text_sha, base_build, params)
    folder = kld_cache_root() / key
    logits = folder / "logits.bin"
    meta_file = folder / "meta.json"
    with file_lock(folder / ".lock"):
        if meta_file.is_file() and logits.is_file():
            meta = json.loads(meta_file.read_text())
            if meta.get("size") == logits.stat().st_size:
                return BaseLogits(key, logits, meta)
        tmp = folder / "logits.bin.tmp"
        tmp.unlink(missing_ok=True)
        tool = base_build.tool("llama-perplexity")
        cmd = [str(tool), "-m", str(model.path), "-f", str(text), *params.args(), "--kl-divergence-base", str(tmp)]
        if echo:
            print(
                f"computing KLD base {key} ({base_build.variant}-{base_build.backend}, "
                f"K {params.cache_type_k} / V {params.cache_type_v})",
                file=sys.stderr,
            )
        exe = execute(cmd, env=tool_env(base_build), timeout_s=timeout_s, echo=echo)
        (folder / "base.stdout").write_text(exe.stdout)
        (folder / "base.stderr").write_text(exe.stderr)
        if exe.returncode != 0 or exe.timed_out:
            tmp.unlink(missing_ok=True)
            raise KldBaseError(
                f"KLD base run failed ({'timeout' if exe.timed_out else f'exit {exe.returncode}'}): "
                f"{exe.last_error_line()}",
                exe,
            )
        try:
            final = parse_final_estimate(f"{exe.stdout}\n{exe.stderr}")
        except ParseError as exc:
            tmp.unlink(missing_ok=True)
            raise KldBaseError(f"KLD base run failed: {exc}", exe) from exc
        if not tmp.is_file():
            raise KldBaseError(f"KLD base run wrote no logits file {tmp}", exe)
        tmp.replace(logits)
        meta = {
            "key": key,
            "size": logits.stat().st_size,
            "variant": base_build.variant,
            "backend": base_build.backend,
            "source_commit": base_build.source_commit,
            "build_id": build_id(base_build),
            "model_sha256": model.sha256,
            "text_sha256": text_sha,
            "params": params.as_dict(),
            "command": cmd,
            "ppl": final["ppl"],
            "ppl_err": final["ppl_err"],
            "created_at": exe.finished_at,
            "seconds": exe.seconds,
        }
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
        return BaseLogits(key, logits, meta)


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class PplRequest:
    params: PplParams
    text: Path
    kld: KldBase | None = None
    root: Path | None = None
    base_key: str = field(default="")


def ppl_config(ctx: RunContext, req: PplRequest) -> tuple[str, dict[str, Any], str]:
    """(config hash, params as stored, text sha256) of a perplexity run, without running anything.

    With KLD the base's identity (its variant, build, KV settings) is part of the configuration, so a new upstream
    build or base setting is a new configuration."""
    text_sha = cached_sha256(req.text)
    stored: dict[str, Any] = {**req.params.as_dict(), "kld": None}
    identity: dict[str, Any] = {**req.params.identity(), "kld": None}
    if req.kld:
        base_build = load_build(req.kld.variant, req.kld.backend or ctx.build.backend, req.root)
        base_params = req.kld.params_for(req.params)
        key = kld_base_key(ctx.model, text_sha, base_build, base_params)
        base_desc = {
            "variant": base_build.variant,
            "backend": base_build.backend,
            "build": build_id(base_build),
            "params": base_params.identity(),
            "key": key,
        }
        stored["kld"] = base_desc
        identity["kld"] = base_desc
    return config_hash("ppl", ctx.build, ctx.host, ctx.model, identity, text_sha), stored, text_sha


def run_perplexity(ctx: RunContext, req: PplRequest) -> RunRecord:
    """Run llama-perplexity once (after the KLD base, if needed) and return the record to store."""
    params = req.params.validate()
    req = replace(req, params=params)
    chash, stored_params, text_sha = ppl_config(ctx, req)
    tool = ctx.build.tool("llama-perplexity")
    fields: dict[str, Any] = {
        "kind": "ppl",
        "config_hash": chash,
        "config": {"kind": "ppl", "params": stored_params},
        "params": stored_params,
        "text_path": str(req.text),
        "text_sha256": text_sha,
        **provenance_fields(ctx),
    }
    base: BaseLogits | None = None
    if req.kld:
        try:
            base = base_logits(
                ctx.model,
                req.text,
                ctx.build.backend,
                params,
                req.kld,
                root=req.root,
                echo=ctx.echo,
                timeout_s=ctx.timeout_s,
            )
        except KldBaseError as exc:
            exe = exc.execution
            fields.update(
                status="failed",
                error=exc.problem,
                command=exe.command if exe else None,
                stdout=exe.stdout if exe else "",
                stderr=exe.stderr if exe else "",
                started_at=exe.started_at if exe else None,
                finished_at=exe.finished_at if exe else None,
                duration_s=exe.seconds if exe else None,
                exit_code=exe.returncode if exe else None,
            )
            return RunRecord(fields=fields)
        cmd = [
            str(tool),
            "-m",
            str(ctx.model.path),
            *params.args(),
            "--kl-divergence-base",
            str(base.path),
            "--kl-divergence",
        ]
    else:
        cmd = [str(tool), "-m", str(ctx.model.path), "-f", str(req.text), *params.args()]
    exe = execute(cmd, env=tool_env(ctx.build), timeout_s=ctx.timeout_s, echo=ctx.echo)
    return perplexity_record(fields, exe, params, base)


def perplexity_record(fields: dict[str, Any], exe: Execution, params: PplParams, base: BaseLogits | None) -> RunRecord:
    """The record of a finished llama-perplexity process: 'ok' with its parsed numbers, or 'failed' with the reason."""
    fields = {**fields, **exe.fields()}
    if error := exe.failure("llama-perplexity"):
        fields.update(status="failed", error=error)
        return RunRecord(fields=fields)
    try:
        ppl_row, kld_row = parse_perplexity_output(exe.stdout, exe.stderr, kld=base is not None)
    except ParseError as exc:
        fields.update(status="failed", error=str(exc))
        return RunRecord(fields=fields)
    if not math.isfinite(ppl_row["ppl"]):
        fields.update(status="failed", error=f"perplexity is {ppl_row['ppl']}")
        return RunRecord(fields=fields)
    fields.update(status="ok", error=None)
    ppl_row = {"n_ctx": params.ctx, "n_chunks": params.chunks, **ppl_row}
    if kld_row is not None and base is not None:
        kld_row = {
            "base_key": base.key,
            "base_variant": base.meta["variant"],
            "base_source_commit": base.meta["source_commit"],
            "base_config": json.dumps(fields["params"]["kld"], sort_keys=True),
            **kld_row,
        }
    return RunRecord(fields=fields, perplexity=ppl_row, kld=kld_row)
