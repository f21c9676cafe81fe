"""Per-call latency of token sampling from one build's libraries: upstream's sampler chain against the sortfree
sampler, on the CPU (`llama_sampler_apply`) and on a ggml backend (the samplers' backend graphs, as backend
sampling builds them). One mode per process, so that two builds' libraries never meet in one process:

    python -m pyharness.sampler_bench --lib-dir build/upstream-cpu/bin --mode chain --vocab 151936

prints one JSON object: the configuration and every timed call in microseconds. Modes:

    chain             llama_sampler_apply of top_k -> top_p -> min_p -> temp -> dist (CPU, one row)
    sortfree          llama_sampler_apply of llama_sampler_init_sortfree (CPU, one row; patched builds)
    backend-chain     the chain's backend graph (top_k, argsort, softmax, cumsum, ...) for --rows rows
    backend-sortfree  the sortfree sampler's backend graph (GGML_OP_SAMPLE_SORTFREE) for --rows rows
    op                one GGML_OP_SAMPLE_SORTFREE node over all --rows rows (one launch; patched builds)

The token arrays are filled before every CPU call outside the timed region (the sortfree sampler's CPU path copies
the logits out of the array into its tensor, inside); backend modes time `ggml_backend_graph_compute` and a
synchronize, with the inputs (logits, uniforms) set before, and a CPU backend runs on --threads threads.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pyharness.errors import HarnessError
from pyharness.ggml_ctypes import (
    GGML_TYPE_F32,
    N_UNIFORMS,
    InitParams,
    TokenData,
    TokenDataArray,
    load_library,
    set_backend_threads,
)

MODES = ("chain", "sortfree", "backend-chain", "backend-sortfree", "op")


@dataclass
class BenchConfig:
    mode: str
    vocab: int
    rows: int = 1
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    iters: int = 200
    warmup: int = 20
    backend: str = "CPU"
    threads: int = 1  # threads of a CPU backend (backend modes)
    seed: int = 1234


class _SamplerData(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("logits", "probs", "sampled", "candidates")]


_BACKEND_INIT = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32)
_BACKEND_APPLY = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_SamplerData))
_BACKEND_SET_INPUT = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _SamplerI(ctypes.Structure):
    # struct llama_sampler_i: name, accept, apply, reset, clone, free, backend_init, backend_accept,
    # backend_apply, backend_set_input, backend_reset, copy_state
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("accept", ctypes.c_void_p),
        ("apply", ctypes.c_void_p),
        ("reset", ctypes.c_void_p),
        ("clone", ctypes.c_void_p),
        ("free", ctypes.c_void_p),
        ("backend_init", _BACKEND_INIT),
        ("backend_accept", ctypes.c_void_p),
        ("backend_apply", _BACKEND_APPLY),
        ("backend_set_input", _BACKEND_SET_INPUT),
        ("backend_reset", ctypes.c_void_p),
        ("copy_state", ctypes.c_void_p),
    ]


class _Sampler(ctypes.Structure):
    _fields_ = [("iface", ctypes.POINTER(_SamplerI)), ("ctx", ctypes.c_void_p)]


class Libs:
    """libggml-base, libggml and libllama of one build, with the signatures this module calls."""

    def __init__(self, lib_dir: Path) -> None:
        load_library(lib_dir, "ggml-base")
        # libggml's handle resolves its own symbols (the backend registry) and those of libggml-base
        self.base = self.ggml = load_library(lib_dir, "ggml")
        self.llama = load_library(lib_dir, "llama")
        vp, i64, f, i32, u32, sz = (
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_float,
            ctypes.c_int32,
            ctypes.c_uint32,
            ctypes.c_size_t,
        )
        sig = {
            (self.base, "ggml_init"): (vp, [InitParams]),
            (self.base, "ggml_free"): (None, [vp]),
            (self.base, "ggml_new_tensor_2d"): (vp, [vp, ctypes.c_int, i64, i64]),
            (self.base, "ggml_view_1d"): (vp, [vp, vp, i64, sz]),
            (self.base, "ggml_new_graph_custom"): (vp, [vp, sz, ctypes.c_bool]),
            (self.base, "ggml_build_forward_expand"): (None, [vp, vp]),
            (self.base, "ggml_set_input"): (None, [vp]),
            (self.base, "ggml_set_output"): (None, [vp]),
            (self.base, "ggml_tensor_overhead"): (sz, []),
            (self.base, "ggml_graph_overhead_custom"): (sz, [sz, ctypes.c_bool]),
            (self.base, "ggml_gallocr_new"): (vp, [vp]),
            (self.base, "ggml_gallocr_alloc_graph"): (ctypes.c_bool, [vp, vp]),
            (self.base, "ggml_gallocr_free"): (None, [vp]),
            (self.base, "ggml_backend_tensor_set"): (None, [vp, vp, sz, sz]),
            (self.base, "ggml_backend_get_default_buffer_type"): (vp, [vp]),
            (self.base, "ggml_backend_graph_compute"): (ctypes.c_int, [vp, vp]),
            (self.base, "ggml_backend_synchronize"): (None, [vp]),
            (self.base, "ggml_backend_free"): (None, [vp]),
            (self.base, "ggml_backend_init_by_name"): (vp, [ctypes.c_char_p, ctypes.c_char_p]),
            (self.llama, "llama_backend_init"): (None, []),
            (self.llama, "llama_sampler_chain_init"): (vp, [ctypes.c_bool]),
            (self.llama, "llama_sampler_chain_add"): (None, [vp, vp]),
            (self.llama, "llama_sampler_init_top_k"): (vp, [i32]),
            (self.llama, "llama_sampler_init_top_p"): (vp, [f, sz]),
            (self.llama, "llama_sampler_init_min_p"): (vp, [f, sz]),
            (self.llama, "llama_sampler_init_temp"): (vp, [f]),
            (self.llama, "llama_sampler_init_dist"): (vp, [u32]),
            (self.llama, "llama_sampler_apply"): (None, [vp, ctypes.POINTER(TokenDataArray)]),
            (self.llama, "llama_sampler_free"): (None, [vp]),
        }
        for (lib, name), (res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.has_sortfree = hasattr(self.llama, "llama_sampler_init_sortfree")
        if self.has_sortfree:
            self.llama.llama_sampler_init_sortfree.restype = vp
            self.llama.llama_sampler_init_sortfree.argtypes = [f, i32, f, f, u32]
            self.base.ggml_sample_sortfree.restype = vp
            self.base.ggml_sample_sortfree.argtypes = [vp, vp, vp, f, i32, f, f]
        self.llama.llama_backend_init()


def make_sampler(libs: Libs, cfg: BenchConfig, sortfree: bool) -> int:
    lib = libs.llama
    if sortfree:
        if not libs.has_sortfree:
            raise HarnessError("this build has no llama_sampler_init_sortfree", "use the patched variant's build")
        return lib.llama_sampler_init_sortfree(cfg.temp, cfg.top_k, cfg.top_p, cfg.min_p, cfg.seed)
    chain = lib.llama_sampler_chain_init(True)  # no_perf
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(cfg.top_k))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(cfg.top_p, 1))
    if cfg.min_p > 0.0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(cfg.min_p, 1))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(cfg.temp))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(cfg.seed))
    return chain


def logits_rows(cfg: BenchConfig) -> np.ndarray:
    """LLM-like logits: a gaussian bulk and a few boosted tokens per row."""
    rng = np.random.default_rng(cfg.seed)
    x = rng.normal(0.0, 2.0, (cfg.rows, cfg.vocab))
    for r in range(cfg.rows):
        x[r, rng.choice(cfg.vocab, 8, replace=False)] += rng.uniform(4.0, 8.0, 8)
    return x.astype(np.float32)


def bench_cpu(libs: Libs, cfg: BenchConfig) -> list[float]:
    logits = logits_rows(cfg)[0]
    ids = np.arange(cfg.vocab, dtype=np.int32)
    n = cfg.vocab
    data = (TokenData * n)()
    # the token array is filled field by field before every call, as common_sampler fills it from the logits
    # (plain stores: a memmove of this size would use non-temporal stores and leave the array out of the cache)
    view = np.frombuffer(data, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
    arr = TokenDataArray(data, n, -1, False)
    ref = ctypes.byref(arr)
    smpl = make_sampler(libs, cfg, cfg.mode == "sortfree")
    apply = libs.llama.llama_sampler_apply
    times: list[float] = []
    try:
        for it in range(cfg.warmup + cfg.iters):
            view["id"] = ids
            view["logit"] = logits
            view["p"] = 0.0
            arr.data, arr.size, arr.selected, arr.sorted = data, n, -1, False
            t0 = time.perf_counter_ns()
            apply(smpl, ref)
            t1 = time.perf_counter_ns()
            if not 0 <= arr.selected < arr.size:
                raise HarnessError(f"{cfg.mode}: no token selected", "check the sampler parameters")
            if it >= cfg.warmup:
                times.append((t1 - t0) / 1000.0)
    finally:
        libs.llama.llama_sampler_free(smpl)
    return times


def bench_backend(libs: Libs, cfg: BenchConfig) -> list[float]:
    b = libs.base
    backend = b.ggml_backend_init_by_name(cfg.backend.encode(), None)
    if not backend:
        raise HarnessError(f"no ggml backend named {cfg.backend!r} in this build", "use CPU, or CUDA0 on a CUDA build")
    buft = b.ggml_backend_get_default_buffer_type(backend)
    set_backend_threads(b, backend, cfg.threads)
    n_nodes = 64 * cfg.rows + 64
    mem = b.ggml_tensor_overhead() * 4 * n_nodes + b.ggml_graph_overhead_custom(n_nodes, False)
    ctx = b.ggml_init(InitParams(mem, None, True))
    samplers: list[int] = []
    galloc = None
    try:
        gf = b.ggml_new_graph_custom(ctx, n_nodes, False)
        logits = b.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cfg.vocab, cfg.rows)
        b.ggml_set_input(logits)
        outs = []
        if cfg.mode == "op":
            if not libs.has_sortfree:
                raise HarnessError("this build has no ggml_sample_sortfree", "use the patched variant's build")
            u = b.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, N_UNIFORMS, cfg.rows)
            b.ggml_set_input(u)
            outs.append(b.ggml_sample_sortfree(ctx, logits, u, cfg.temp, cfg.top_k, cfg.top_p, cfg.min_p))
            inputs = [(u, np.random.default_rng(cfg.seed).random((cfg.rows, N_UNIFORMS), dtype=np.float32))]
        else:
            inputs = []
            for r in range(cfg.rows):
                smpl = make_sampler(libs, cfg, cfg.mode == "backend-sortfree")
                samplers.append(smpl)
                s = ctypes.cast(smpl, ctypes.POINTER(_Sampler)).contents
                iface = s.iface.contents
                if not iface.backend_init(smpl, buft, 1):
                    what = f"{cfg.mode}: backend {cfg.backend} does not support every op of the sampler"
                    raise HarnessError(what, "run it on another backend")
                row = b.ggml_view_1d(ctx, logits, cfg.vocab, r * cfg.vocab * 4)
                data = _SamplerData(row, None, None, None)
                iface.backend_apply(smpl, ctx, gf, ctypes.byref(data))
                if not data.sampled:
                    raise HarnessError(f"{cfg.mode}: the sampler produced no sampled token", "")
                outs.append(data.sampled)
        for t in outs:
            b.ggml_set_output(t)
            b.ggml_build_forward_expand(gf, t)
        galloc = b.ggml_gallocr_new(buft)
        if not b.ggml_gallocr_alloc_graph(galloc, gf):
            raise HarnessError("could not allocate the sampling graph", "")
        x = np.ascontiguousarray(logits_rows(cfg))
        b.ggml_backend_tensor_set(logits, x.ctypes.data, 0, x.nbytes)
        for t, v in inputs:
            b.ggml_backend_tensor_set(t, v.ctypes.data, 0, v.nbytes)
        times: list[float] = []
        for it in range(cfg.warmup + cfg.iters):
            for smpl in samplers:
                ctypes.cast(smpl, ctypes.POINTER(_Sampler)).contents.iface.contents.backend_set_input(smpl)
            b.ggml_backend_synchronize(backend)
            t0 = time.perf_counter_ns()
            status = b.ggml_backend_graph_compute(backend, gf)
            b.ggml_backend_synchronize(backend)
            t1 = time.perf_counter_ns()
            if status != 0:
                raise HarnessError(f"graph compute failed with status {status}", "")
            if it >= cfg.warmup:
                times.append((t1 - t0) / 1000.0)
        return times
    finally:
        if galloc:
            b.ggml_gallocr_free(galloc)
        for smpl in samplers:
            libs.llama.llama_sampler_free(smpl)
        b.ggml_free(ctx)
        b.ggml_backend_free(backend)


def unsupported(libs: Libs, mode: str) -> str:
    """Why this build cannot run the mode, or an empty string."""
    if mode in ("sortfree", "backend-sortfree", "op") and not libs.has_sortfree:
        return "the build has no sortfree sampler"
    return ""


def run_batch(lib_dir: Path, configs: list[BenchConfig]) -> list[dict[str, object]]:
    """Every configuration in one process (one build's libraries); modes the build lacks are marked skipped."""
    libs = Libs(lib_dir)
    out: list[dict[str, object]] = []
    for cfg in configs:
        if cfg.mode not in MODES:
            raise HarnessError(f"unknown mode {cfg.mode!r}", f"one of: {', '.join(MODES)}")
        if cfg.mode in ("chain", "sortfree") and cfg.rows != 1:
            raise HarnessError("the CPU sampler modes sample one row", "use --rows 1, or a backend mode")
        reason = unsupported(libs, cfg.mode)
        if reason:
            out.append({**asdict(cfg), "skipped": reason})
            continue
        times = bench_cpu(libs, cfg) if cfg.mode in ("chain", "sortfree") else bench_backend(libs, cfg)
        out.append(
            {
                **asdict(cfg),
                "median_us": statistics.median(times),
                "mean_us": statistics.fmean(times),
                "min_us": min(times),
                "samples_us": [round(t, 3) for t in times],
            }
        )
        print(f"{cfg.mode} vocab={cfg.vocab} rows={cfg.rows}: {out[-1]['median_us']:.1f} us", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyharness.sampler_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib-dir", type=Path, required=True, help="a build's bin/ (libllama.so, libggml*.so)")
    ap.add_argument("--batch", type=Path, help="a JSON list of configurations; prints a JSON list of results")
    ap.add_argument("--mode", choices=MODES)
    ap.add_argument("--vocab", type=int, default=151936)
    defaults = BenchConfig(mode="chain", vocab=0)
    for name in ("rows", "temp", "top_k", "top_p", "min_p", "iters", "warmup", "backend", "threads", "seed"):
        value = getattr(defaults, name)
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = ap.parse_args(argv)
    try:
        if args.batch:
            configs = [BenchConfig(**c) for c in json.loads(args.batch.read_text())]
            print(json.dumps(run_batch(args.lib_dir, configs)))
            return 0
        if not args.mode:
            ap.error("--mode or --batch is required")
        cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k not in ("lib_dir", "batch")})
        result = run_batch(args.lib_dir, [cfg])[0]
        if "skipped" in result:
            raise HarnessError(f"{cfg.mode}: {result['skipped']}", "use the patched variant's build")
        print(json.dumps(result))
    except HarnessError as exc:
        print(f"sampler_bench: {exc.problem}" + (f"; {exc.fix}" if exc.fix else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
