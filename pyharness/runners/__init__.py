"""What every evaluation run shares: running a built tool, its provenance, and its configuration hash.

A run executes one command of one build to completion, then becomes one `store.RunRecord`; nothing reaches the
store until the process has finished and its output has been parsed (see `store.Store.record`).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pyharness.build import BuildInfo, build_id
from pyharness.errors import HarnessError
from pyharness.host import HostInfo, host_info
from pyharness.text import cached_sha256

SYNTH_PREFIX = "synth:"
CONFIG_VERSION = 1  # bump when the meaning of a stored configuration changes (forces re-runs on resume)


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Execution:
    """A finished (or timed out) process: its command, exit code, both streams and when it ran."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    started_at: str
    finished_at: str
    seconds: float
    timed_out: bool = False
    other_cpu: float | None = None  # share of the machine's CPU time used by other processes while this ran

    def fields(self) -> dict[str, Any]:
        """The `runs` columns this execution fills: command, streams, times, exit code, machine load."""
        return {
            "command": self.command,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_s": self.seconds,
            "exit_code": self.returncode,
            "other_cpu": self.other_cpu,
        }

    def failure(self, tool: str) -> str | None:
        """Why the process failed (timed out, or a non-zero exit with its last error line), or None if it did not."""
        if self.timed_out:
            return f"{tool} timed out after {self.seconds:.0f} s"
        if self.returncode != 0:
            return f"{tool} exited {self.returncode}: {self.last_error_line()}"
        return None

    def last_error_line(self) -> str:
        for stream in (self.stderr, self.stdout):
            lines = [ln.strip() for ln in stream.splitlines() if ln.strip()]
            for line in reversed(lines):
                if "error" in line.lower() or "failed" in line.lower():
                    return line
        lines = [ln.strip() for ln in (self.stderr or self.stdout).splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit {self.returncode}"


def _cpu_busy_seconds() -> tuple[float, int] | None:
    """(busy CPU seconds of the whole machine since boot, number of CPUs) from /proc/stat, or None."""
    try:
        with open("/proc/stat") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    fields = [int(x) for x in lines[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    cpus = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
    return busy / os.sysconf("SC_CLK_TCK"), cpus


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the harness dies, so no orphan keeps running."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass


def execute(
    command: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    echo: bool = False,
) -> Execution:
    """Run a built tool to completion, capturing stdout and stderr apart. Never raises on a non-zero exit.

    The child is killed if the harness dies (Linux), so an interrupted run leaves neither a row nor a process.
    """
    args = [str(a) for a in command]
    full_env = {**os.environ, **(env or {})}
    if echo:
        print("+ " + " ".join(args), file=sys.stderr)
    started = now_utc()
    busy0, child0 = _cpu_busy_seconds(), _children_cpu_seconds()
    t0 = time.monotonic()
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    try:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=full_env,
            preexec_fn=preexec,
        )
    except OSError as exc:
        raise HarnessError(f"cannot start {args[0]}: {exc}", "rebuild the variant with `pyharness build`") from exc
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        timed_out = True
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    wall = time.monotonic() - t0
    busy1, child1 = _cpu_busy_seconds(), _children_cpu_seconds()
    other = None
    if busy0 and busy1 and wall > 0.5:
        other = (busy1[0] - busy0[0] - (child1 - child0)) / (wall * busy1[1])
        other = round(min(1.0, max(0.0, other)), 3)
    return Execution(
        command=args,
        returncode=proc.returncode,
        stdout=out,
        stderr=err,
        started_at=started,
        finished_at=now_utc(),
        seconds=round(wall, 3),
        timed_out=timed_out,
        other_cpu=other,
    )


@dataclass
class ModelRef:
    """A model as the runs know it: the name it was asked for, the resolved file and its hash."""

    name: str
    path: Path
    sha256: str
    size: int


def resolve_model(name_or_path: str) -> ModelRef:
    """A model name (`smollm2-135m`), a `.gguf` path, or `synth:SHAPE[:FTYPE]` (random weights, made once)."""
    if name_or_path.startswith(SYNTH_PREFIX):
        path = synth_model(name_or_path)
    else:
        from pyharness.models import get_model

        path = Path(get_model(name_or_path))
    return ModelRef(name=name_or_path, path=path, sha256=cached_sha256(path), size=path.stat().st_size)


def parse_synth(name: str) -> tuple[str, str]:
    """`synth:llama3-8b` -> ("llama3-8b", "q4_0"); `synth:llama3-8b:f16` -> ("llama3-8b", "f16")."""
    rest = name[len(SYNTH_PREFIX) :]
    shape, _, ftype = rest.partition(":")
    return shape, ftype or "q4_0"


def check_synth(name: str) -> None:
    """Raise unless `name` names a known synthetic shape (without generating anything)."""
    shape, ftype = parse_synth(name)
    try:
        from pyharness import synth
    except ImportError as exc:
        raise HarnessError(f"model {name}: pyharness.synth is not available", "install the full checkout") from exc
    if shape not in synth.SHAPES:
        raise HarnessError(f"unknown synthetic shape {shape!r}", "one of: " + ", ".join(sorted(synth.SHAPES)))
    if ftype not in synth.FTYPES:
        raise HarnessError(f"unknown synthetic ftype {ftype!r} in {name}", f"use one of: {', '.join(synth.FTYPES)}")


def synth_path(name: str) -> Path:
    """Where the synthetic model `synth:SHAPE[:FTYPE]` is (or will be) written."""
    from pyharness import paths

    shape, ftype = parse_synth(name)
    return paths.cache_dir() / "models" / f"synth-{shape}-{ftype}.gguf"


def synth_model(name: str) -> Path:
    from pyharness import synth

    check_synth(name)
    shape, ftype = parse_synth(name)
    out = synth_path(name)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(synth.write_synthetic(shape, out, ftype=ftype))


class CacheRunFlags(Protocol):
    """The settings of a run that the common tools take alike (the params classes of the runners have them; read-only
    members, so that frozen dataclasses match)."""

    @property
    def cache_type_k(self) -> str: ...
    @property
    def cache_type_v(self) -> str: ...
    @property
    def flash_attn(self) -> str: ...
    @property
    def threads(self) -> int | None: ...
    @property
    def batch(self) -> int | None: ...
    @property
    def ubatch(self) -> int | None: ...
    @property
    def n_gpu_layers(self) -> int | None: ...


def cache_and_run_args(p: CacheRunFlags) -> list[str]:
    """The KV cache types, flash attention and run settings (threads, batch sizes, GPU layers) as the common tools
    take them; settings left None are not passed, so the tool's defaults apply."""
    out = ["-ctk", p.cache_type_k, "-ctv", p.cache_type_v, "-fa", p.flash_attn]
    for flag, value in (("-t", p.threads), ("-b", p.batch), ("-ub", p.ubatch), ("-ngl", p.n_gpu_layers)):
        if value is not None:
            out += [flag, str(value)]
    return out


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(
    kind: str,
    build: BuildInfo,
    host: HostInfo,
    model: ModelRef,
    params: Mapping[str, Any],
    text_sha256: str = "",
) -> str:
    """Identity of a run's configuration: what was run (kind, build inputs, model and text bytes, every parameter) and
    on which hardware. Two runs with the same hash measure the same thing; a matrix skips cells whose hash is stored."""
    ident = {
        "v": CONFIG_VERSION,
        "kind": kind,
        "variant": build.variant,
        "backend": build.backend,
        "build": build_id(build),
        "hardware": host.hardware_key(),
        "model_sha256": model.sha256,
        "text_sha256": text_sha256,
        "params": params,
    }
    return hashlib.sha256(canonical(ident).encode()).hexdigest()[:20]


@dataclass
class RunContext:
    """Where a run comes from: build, host, model; and the matrix cell that asked for it, if any."""

    build: BuildInfo
    model: ModelRef
    host: HostInfo = field(default_factory=host_info)
    matrix: str = ""
    cell: str = ""
    timeout_s: float | None = None
    echo: bool = False


def provenance_fields(ctx: RunContext) -> dict[str, Any]:
    """The `runs` columns that say where a run came from."""
    b, h = ctx.build, ctx.host
    return {
        "variant": b.variant,
        "backend": b.backend,
        "source_commit": b.source_commit,
        "upstream_commit": b.upstream_commit,
        "series_hash": b.series_hash,
        "series_in_sync": int(b.series_in_sync),
        "build_id": build_id(b),
        "build_dir": b.build_dir,
        "cmake_flags": json.dumps(b.cmake_flags),
        "compiler": b.compiler,
        "build_cuda_version": b.cuda_version,
        "built_at": b.built_at,
        "host_name": h.hostname,
        "host_cpu": h.cpu,
        "host_cpu_count": h.cpu_count,
        "host_os": h.os,
        "host_memory_gib": h.memory_gib,
        "gpu_name": h.gpu_name,
        "gpu_count": h.gpu_count,
        "gpu_driver": h.gpu_driver,
        "cuda_version": h.cuda_version,
        "model_name": ctx.model.name,
        "model_path": str(ctx.model.path),
        "model_sha256": ctx.model.sha256,
        "model_size": ctx.model.size,
        "matrix": ctx.matrix,
        "cell": ctx.cell,
        # Ray gives a GPU task its GPU this way; recorded for GPU builds only (CPU runs ignore it)
        "gpu_visible": os.environ.get("CUDA_VISIBLE_DEVICES") if b.backend != "cpu" else None,
    }


def run_fields(kind: str, ctx: RunContext, stored: Mapping[str, Any], chash: str | None = None) -> dict[str, Any]:
    """The `runs` columns every run starts with: kind, configuration hash, parameters and provenance."""
    chash = chash or config_hash(kind, ctx.build, ctx.host, ctx.model, stored)
    return {
        "kind": kind,
        "config_hash": chash,
        "config": {"kind": kind, "params": dict(stored)},
        "params": dict(stored),
        **provenance_fields(ctx),
    }


def tool_env(build: BuildInfo) -> dict[str, str]:
    """Make the build's own shared libraries win over any others on the loader path."""
    lib = str(build.bin_dir)
    old = os.environ.get("LD_LIBRARY_PATH", "")
    return {"LD_LIBRARY_PATH": f"{lib}:{old}" if old else lib}


def ensure_file(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        raise HarnessError(f"{what} {path} does not exist")
    return Path(path)
