"""End-to-end decoding speed with sampling (`kind = "decode"` in a matrix): `llama-completion` generates a fixed
number of tokens (`--ignore-eos`) with each sampler setup, and the decode rate is the generated tokens over the
time spent evaluating and sampling them (llama.cpp's own `common_perf_print` timings: eval + sampling).

Sampler setups (the `samplers` list of the eval):

    greedy       --temp 0
    chain        top-k 40, top-p 0.9, temperature 0.8, sampled on the CPU by upstream's chain
    chain-bs     the same chain with backend sampling (-bs)
    sortfree     the same parameters with --sampler-kernel sortfree (CPU path)
    sortfree-bs  --sampler-kernel sortfree with backend sampling

A build without `--sampler-kernel` (upstream) skips the sortfree setups.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from pyharness.runners import RunContext, execute, run_fields, tool_env
from pyharness.store import FeatureEval, RunRecord

FEATURE = "sortfree-sampler"
SAMPLING = ["--top-k", "40", "--top-p", "0.9", "--min-p", "0.0", "--temp", "0.8"]
SETUPS: dict[str, list[str]] = {
    "greedy": ["--temp", "0"],
    "chain": SAMPLING,
    "chain-bs": [*SAMPLING, "-bs"],
    "sortfree": [*SAMPLING, "--sampler-kernel", "sortfree"],
    "sortfree-bs": [*SAMPLING, "--sampler-kernel", "sortfree", "-bs"],
}
TIMING = re.compile(
    r"common_perf_print:\s+(?P<what>eval time|sampling time)\s+=\s+(?P<ms>[0-9.]+) ms(?:\s*/\s*(?P<n>\d+))?"
)


@dataclass
class DecodeParams:
    samplers: list[str] = field(default_factory=lambda: ["greedy", "chain", "sortfree-bs"])
    n_gen: int = 128
    repetitions: int = 3
    prompt: str = "The history of the city begins"
    ctx: int = 1024
    threads: int | None = None
    n_gpu_layers: int | None = None
    seed: int = 42

    def command(self, tool: str, model: str, setup: str) -> list[str]:
        cmd = [tool, "-m", model, "-p", self.prompt, "-n", str(self.n_gen), "-c", str(self.ctx)]
        cmd += ["--seed", str(self.seed), "--ignore-eos", "-no-cnv", "--perf"]
        if self.threads is not None:
            cmd += ["-t", str(self.threads)]
        if self.n_gpu_layers is not None:
            cmd += ["-ngl", str(self.n_gpu_layers)]
        return cmd + SETUPS[setup]


def parse_timings(stderr: str) -> tuple[float, int, float]:
    """(eval ms, eval runs, sampling ms) from common_perf_print; raises ValueError when missing."""
    found: dict[str, tuple[float, int]] = {}
    for m in TIMING.finditer(stderr):
        found[m["what"]] = (float(m["ms"]), int(m["n"] or 0))
    if "eval time" not in found or "sampling time" not in found:
        raise ValueError("llama-completion printed no eval/sampling timings (common_perf_print)")
    return found["eval time"][0], found["eval time"][1], found["sampling time"][0]


def run_decode(ctx: RunContext, params: DecodeParams) -> RunRecord:
    fields = run_fields("decode", ctx, asdict(params))
    tool = str(ctx.build.tool("llama-completion"))
    helptext = execute([tool, "--help"], env=tool_env(ctx.build), timeout_s=60).stdout
    has_sortfree = "--sampler-kernel" in helptext
    results: dict[str, Any] = {}
    evals: list[FeatureEval] = []
    commands, logs = [], []
    started = finished = None
    for setup in params.samplers:
        if setup.startswith("sortfree") and not has_sortfree:
            results[setup] = {"skipped": "the build has no --sampler-kernel"}
            continue
        rates = []
        for _ in range(params.repetitions):
            cmd = params.command(tool, str(ctx.model.path), setup)
            exe = execute(cmd, env=tool_env(ctx.build), timeout_s=ctx.timeout_s, echo=ctx.echo)
            started = started or exe.started_at
            finished = exe.finished_at
            commands.append(exe.command)
            logs.append(exe.stderr[-4000:])
            try:
                if error := exe.failure("llama-completion"):
                    raise ValueError(error)
                eval_ms, runs, sampling_ms = parse_timings(exe.stderr)
            except ValueError as exc:
                # the failing execution's own columns, with the run's first start
                fields.update(exe.fields(), status="failed", error=f"{setup}: {exc}", started_at=started)
                return RunRecord(fields=fields)
            rates.append(runs / ((eval_ms + sampling_ms) / 1000.0))
        results[setup] = {"tokens_per_s": rates, "median": statistics.median(rates)}
        evals.append(FeatureEval(FEATURE, f"decode {setup} tokens/s", statistics.median(rates), "t/s"))
    fields.update(
        status="ok" if evals else "failed",
        error=None if evals else "no sampler setup ran",
        command=json.dumps(commands),
        stdout=json.dumps(results),
        stderr="\n----\n".join(logs),
        started_at=started,
        finished_at=finished,
        exit_code=0,
    )
    return RunRecord(fields=fields, feature_evals=evals)
