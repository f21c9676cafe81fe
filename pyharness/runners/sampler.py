"""Sampler latency runs (`kind = "sampler"` in a matrix): upstream's sampler chain against the sortfree sampler,
measured by `pyharness.sampler_bench` in a process that loads only the run's build. Every configuration's median
goes to `feature_eval` (feature `sortfree-sampler`), every timed call to the run's stdout (JSON)."""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyharness.runners import RunContext, execute, run_fields, tool_env
from pyharness.store import FeatureEval, RunRecord

FEATURE = "sortfree-sampler"


@dataclass
class SamplerBenchParams:
    """The configurations of one run: every mode x vocab x rows, with the same sampler parameters."""

    modes: list[str] = field(default_factory=lambda: ["chain", "sortfree"])
    vocab: list[int] = field(default_factory=lambda: [151936])
    rows: list[int] = field(default_factory=lambda: [1])
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    iters: int = 200
    backend_name: str = "CPU"
    threads: int = 1

    def configs(self) -> list[dict[str, Any]]:
        out = []
        for mode, vocab, rows in itertools.product(self.modes, self.vocab, self.rows):
            if mode in ("chain", "sortfree") and rows != 1:
                continue  # the CPU sampler path samples one row
            out.append(
                {
                    "mode": mode,
                    "vocab": vocab,
                    "rows": rows,
                    "temp": self.temp,
                    "top_k": self.top_k,
                    "top_p": self.top_p,
                    "min_p": self.min_p,
                    "iters": self.iters,
                    "warmup": max(5, self.iters // 10),
                    "backend": self.backend_name,
                    "threads": self.threads,
                }
            )
        return out


def metric_name(result: dict[str, Any]) -> str:
    """`chain vocab=151936 rows=1 median`: what the report pivots on."""
    return f"{result['mode']} vocab={result['vocab']} rows={result['rows']} median"


def run_sampler_bench(ctx: RunContext, params: SamplerBenchParams) -> RunRecord:
    fields = run_fields("sampler", ctx, asdict(params))
    with tempfile.TemporaryDirectory(prefix="pyharness-sampler-") as tmp:
        batch = Path(tmp) / "configs.json"
        batch.write_text(json.dumps(params.configs()))
        cmd = [sys.executable, "-m", "pyharness.sampler_bench", "--lib-dir", str(ctx.build.bin_dir)]
        cmd += ["--batch", str(batch)]
        root = str(Path(__file__).resolve().parents[2])
        env = {**tool_env(ctx.build), "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        exe = execute(cmd, env=env, timeout_s=ctx.timeout_s, echo=ctx.echo)
    fields.update(exe.fields())
    if error := exe.failure("sampler_bench"):
        fields.update(status="failed", error=error)
        return RunRecord(fields=fields)
    try:
        results = json.loads(exe.stdout)
    except json.JSONDecodeError as exc:
        fields.update(status="failed", error=f"sampler_bench printed no JSON: {exc}")
        return RunRecord(fields=fields)
    evals = [FeatureEval(FEATURE, metric_name(r), r["median_us"], "us") for r in results if "median_us" in r]
    if not evals:
        fields.update(status="failed", error="no configuration ran (is the build missing the sampler?)")
        return RunRecord(fields=fields)
    fields.update(status="ok", error=None)
    return RunRecord(fields=fields, feature_evals=evals)
