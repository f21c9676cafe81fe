"""The paged KV cache against the standard one, in one run of one build (issue 7, item 5; feature `paged-kv`):

`kind = "paged-generate"`
    greedy generation on several sequences at once, both caches token for token (`pyharness.paged_generation`, in
    a process that loads only the run's libllama through llama-cpp-python).
`kind = "paged-server"`
    `llama-server --parallel N` answering N requests, with each cache, requests sent together and one after
    another, each trial repeated (`pyharness.paged_server`).

A run's stdout holds the whole result as JSON (tokens, texts, answers, the server trials), which
`pyharness.paged_report` renders; `feature_eval` gets the counts. A difference between the caches is a result, not
a failure: a run fails when it could not compare (a tool failed, the paged cache fell back to the standard one, the
standard server did not answer).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyharness.paged_generation import PROMPTS, GenerationConfig
from pyharness.paged_server import MODES, ServerConfig, run_trials, summarize, trials_as_dicts
from pyharness.runners import RunContext, execute, now_utc, run_fields, tool_env
from pyharness.store import FeatureEval, RunRecord

FEATURE = "paged-kv"
GENERATE_KIND = "paged-generate"
SERVER_KIND = "paged-server"
KINDS = (GENERATE_KIND, SERVER_KIND)
INSTALL_BINDINGS = 'CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install llama-cpp-python==0.3.36'


@dataclass
class PagedGenerateParams:
    n_gen: int = 256
    ctx: int = 2048
    ubatch: int = 512
    page_size: int = 64
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    threads: int | None = None
    flash_attn: str = "on"

    def config(self) -> GenerationConfig:
        return GenerationConfig(
            prompts=list(self.prompts),
            n_gen=self.n_gen,
            ctx=self.ctx,
            ubatch=self.ubatch,
            threads=self.threads or os.cpu_count() or 1,
            flash_attn=self.flash_attn,
            page_size=self.page_size,
        ).validate()


@dataclass
class PagedServerParams:
    parallel: int = 4
    n_predict: int = 128
    ctx: int = 2048
    repeats: int = 2
    modes: list[str] = field(default_factory=lambda: list(MODES))
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    threads: int | None = None
    flash_attn: str = "on"
    extra: list[str] = field(default_factory=list)

    def config(self) -> ServerConfig:
        return ServerConfig(
            prompts=list(self.prompts),
            parallel=self.parallel,
            n_predict=self.n_predict,
            ctx=self.ctx,
            threads=self.threads or os.cpu_count() or 1,
            flash_attn=self.flash_attn,
            extra=list(self.extra),
        )


def _python_env(ctx: RunContext) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return {
        **tool_env(ctx.build),
        "LLAMA_CPP_LIB_PATH": str(ctx.build.bin_dir),
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }


def generation_evals(result: dict[str, Any]) -> list[FeatureEval]:
    """Per sequence, the tokens both caches generated alike before the first difference (all of them when
    identical); and how many sequences are identical."""
    evals = []
    for s in result["sequences"]:
        n = len(s["tokens"]["standard"])
        same = n if s["first_token_difference"] is None else s["first_token_difference"]
        evals.append(FeatureEval(FEATURE, f"generate seq{s['seq']} same tokens", same, "tokens"))
    evals.append(FeatureEval(FEATURE, "generate identical sequences", result["identical"], "sequences"))
    return evals


def generation_problem(result: dict[str, Any], bin_dir: Path) -> str | None:
    """Why a generation result cannot stand as a comparison, or None."""
    library = result.get("library", "")
    if not library or Path(library).resolve().parent != bin_dir.resolve():
        return f"llama-cpp-python loaded {library or 'no libllama'}, not the build's in {bin_dir}"
    if not result["paged_active"]:
        lines = "; ".join(result["logs"]["paged"]) or "no KV cache log line"
        return f"the paged context did not use the paged cache ({lines})"
    if result["failed"]:
        return "decoding stopped early: " + "; ".join(f"{k}: {v}" for k, v in result["failed"].items())
    return None


def run_paged_generation(ctx: RunContext, params: PagedGenerateParams) -> RunRecord:
    fields = run_fields(GENERATE_KIND, ctx, asdict(params))
    config = params.config()
    cmd = [sys.executable, "-m", "pyharness.paged_generation", "--model", str(ctx.model.path)]
    cmd += ["--config", json.dumps(asdict(config))]
    exe = execute(cmd, env=_python_env(ctx), timeout_s=ctx.timeout_s, echo=ctx.echo)
    fields.update(exe.fields())
    if error := exe.failure("paged_generation"):
        if "No module named 'llama_cpp'" in exe.stderr:
            error += f" (install the bindings: {INSTALL_BINDINGS})"
        fields.update(status="failed", error=error)
        return RunRecord(fields=fields)
    try:
        result = json.loads(exe.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as exc:
        fields.update(status="failed", error=f"paged_generation printed no JSON: {exc}")
        return RunRecord(fields=fields)
    if problem := generation_problem(result, ctx.build.bin_dir):
        fields.update(status="failed", error=problem)
        return RunRecord(fields=fields)
    fields.update(status="ok", error=None)
    return RunRecord(fields=fields, feature_evals=generation_evals(result))


def server_evals(summary: dict[str, Any]) -> list[FeatureEval]:
    evals = []
    for key, (ok, sent) in summary["answered"].items():
        evals.append(FeatureEval(FEATURE, f"server {key} answered", ok, f"of {sent}"))
    for key, same in summary["deterministic"].items():
        if same is not None:
            evals.append(FeatureEval(FEATURE, f"server {key} deterministic", int(same), "bool"))
    for mode, diffs in summary["across_caches"].items():
        if diffs is not None:
            same = sum(d is None for d in diffs)
            evals.append(FeatureEval(FEATURE, f"server {mode} standard = paged", same, f"of {len(diffs)}"))
    return evals


def run_paged_server(ctx: RunContext, params: PagedServerParams) -> RunRecord:
    fields = run_fields(SERVER_KIND, ctx, asdict(params))
    binary = ctx.build.tool("llama-server")  # a HarnessError that says how to build it
    started, t0 = now_utc(), time.monotonic()
    trials = run_trials(
        binary, ctx.model.path, params.config(), modes=params.modes, repeats=params.repeats, env=tool_env(ctx.build)
    )
    summary = summarize(trials)
    logs = [
        f"# {t.cache} {t.mode} #{t.repeat}: {t.error or 'answers missing'}\n{t.log_tail}" for t in trials if t.log_tail
    ]
    fields.update(
        command=json.dumps([t.command for t in trials]),
        stdout=json.dumps({"summary": summary, "trials": trials_as_dicts(trials)}),
        stderr="\n----\n".join(logs),
        started_at=started,
        finished_at=now_utc(),
        duration_s=round(time.monotonic() - t0, 3),
        exit_code=0,
    )
    standard = [t for t in trials if t.cache == "standard"]
    fell_back = [t for t in trials if t.cache == "paged" and not t.error and not t.paged_active]
    if standard and all(t.answered == 0 for t in standard):
        fields.update(status="failed", error=f"the standard cache's server answered nothing: {standard[0].error}")
    elif fell_back:
        lines = "; ".join(fell_back[0].kv_log) or "no KV cache log line"
        fields.update(status="failed", error=f"the --kv-cache paged server did not use the paged cache ({lines})")
    else:
        fields.update(status="ok", error=None)
    return RunRecord(fields=fields, feature_evals=server_evals(summary) if fields["status"] == "ok" else [])
