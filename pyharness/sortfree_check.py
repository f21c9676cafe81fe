"""Statistical proof of the sorting-free sampler: draws through the GGML op and the llama.cpp sampler of a build,
tested against the exact filtered distribution of the chain top_k -> top_p -> min_p -> temp -> dist.

The op is driven through libggml with ctypes (many rows of the same logits per graph, each row with its own
uniforms); the sampler through libllama's public API (`llama_sampler_init_sortfree`, `llama_sampler_apply`).
The reference distribution is computed here in float64 with the tie rules that `ggml.h` documents, and the
samples are tested with a chi-square goodness-of-fit test whose tail bins are pooled so that every expected
count is at least 5. (The op's fixed-point weights never draw a token below 2^-40 of the max token's weight; the
reference keeps such tokens, a difference no test of this size can see.)
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyharness.errors import HarnessError
from pyharness.ggml_ctypes import (
    GGML_TYPE_F32,
    N_UNIFORMS,
    InitParams,
    Tensor,
    TokenData,
    TokenDataArray,
    load_library,
    set_backend_threads,
)

FLT_MIN = np.finfo(np.float32).tiny


@dataclass(frozen=True)
class SamplerParams:
    temp: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def label(self) -> str:
        return f"temp={self.temp:g} top_k={self.top_k} top_p={self.top_p:g} min_p={self.min_p:g}"


def reference_probs(logits: np.ndarray, sp: SamplerParams) -> np.ndarray:
    """The distribution the op samples from (float64), following the semantics documented in ggml.h."""
    l32 = np.where(np.isnan(logits), -np.inf, logits).astype(np.float32)
    l32 = np.where(np.abs(l32) < FLT_MIN, np.float32(0.0), l32)
    n = l32.size
    probs = np.zeros(n)
    m = l32.max()
    if m == -np.inf:
        return probs
    if not (sp.temp > 0.0) or not math.isfinite(1.0 / np.float32(sp.temp)):
        probs[int(np.argmax(l32 == m))] = 1.0
        return probs
    if m == np.inf:
        inf = l32 == np.inf
        probs[inf] = 1.0 / inf.sum()
        return probs
    keep = np.ones(n, dtype=bool)
    if 0 < sp.top_k < n:
        kth = np.sort(l32)[::-1][sp.top_k - 1]
        keep &= l32 >= kth
    top_p = sp.top_p
    if top_p < 1.0:
        lk = l32.astype(np.float64)
        e = np.where(keep, np.exp(lk - float(m)), 0.0)
        z = e.sum()
        values, inverse = np.unique(lk, return_inverse=True)  # ascending
        mass_at = np.bincount(inverse, weights=e, minlength=values.size)
        mass_gt = np.concatenate([np.cumsum(mass_at[::-1])[::-1][1:], [0.0]])  # mass strictly above each value
        passes = (mass_gt < max(top_p, 0.0) * z) | (values == float(m))
        keep &= passes[inverse]
    if sp.min_p > 0.0:
        log_min_p = np.float32(min(math.log(np.float32(min(sp.min_p, 1.0))), -float(FLT_MIN)))
        d = (l32 - m).astype(np.float32)
        d = np.where(d > -FLT_MIN, np.float32(0.0), d)
        keep &= d >= log_min_p
    w = np.where(keep, np.exp((l32.astype(np.float64) - float(m)) / float(np.float32(sp.temp))), 0.0)
    return w / w.sum()


@dataclass
class ChiSquare:
    statistic: float
    dof: int
    p_value: float
    outside: int  # samples outside the support of the reference

    @property
    def passed(self) -> bool:
        return self.outside == 0 and self.p_value >= 1e-3


def chi_square(samples: np.ndarray, probs: np.ndarray) -> ChiSquare:
    """Goodness of fit of token samples to probs; tokens with expected counts < 5 are pooled (tail bins)."""
    from scipy.stats import chi2

    n = samples.size
    counts = np.bincount(samples, minlength=probs.size)
    outside = int(counts[probs == 0.0].sum())
    support = np.flatnonzero(probs > 0.0)
    expected = probs[support] * n
    observed = counts[support].astype(np.float64)
    order = np.argsort(-expected, kind="stable")
    expected, observed = expected[order], observed[order]
    big = expected >= 5.0
    exp_bins = list(expected[big])
    obs_bins = list(observed[big])
    tail_e, tail_o = expected[~big].sum(), observed[~big].sum()
    if tail_e > 0.0:
        if tail_e >= 5.0 or not exp_bins:
            exp_bins.append(tail_e)
            obs_bins.append(tail_o)
        else:
            exp_bins[-1] += tail_e
            obs_bins[-1] += tail_o
    e = np.array(exp_bins)
    o = np.array(obs_bins)
    dof = len(e) - 1
    if dof < 1:
        return ChiSquare(0.0, 0, 1.0, outside)
    stat = float(((o - e) ** 2 / e).sum())
    return ChiSquare(stat, dof, float(chi2.sf(stat, dof)), outside)


# ---------------------------------------------------------------------------------------------------------------
# ctypes drivers


class OpDriver:
    """ggml_sample_sortfree on a ggml backend of a build: "CPU" (CI), or "CUDA0" on a CUDA build (the H100)."""

    def __init__(self, lib_dir: Path, backend: str = "CPU", n_threads: int = 2) -> None:
        load_library(lib_dir, "ggml-base")
        # libggml's handle resolves its own symbols (the backend registry) and those of libggml-base
        self.lib = b = load_library(lib_dir, "ggml")
        if not hasattr(b, "ggml_sample_sortfree"):
            raise HarnessError(f"{lib_dir} has no ggml_sample_sortfree", "use the patched variant's build")
        vp, i64, sz, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t, ctypes.c_float
        for name, res, args in (
            ("ggml_init", vp, [InitParams]),
            ("ggml_free", None, [vp]),
            ("ggml_new_tensor_1d", vp, [vp, ctypes.c_int, i64]),
            ("ggml_new_tensor_2d", vp, [vp, ctypes.c_int, i64, i64]),
            ("ggml_sample_sortfree", vp, [vp, vp, vp, f, ctypes.c_int32, f, f]),
            ("ggml_new_graph", vp, [vp]),
            ("ggml_build_forward_expand", None, [vp, vp]),
            ("ggml_backend_init_by_name", vp, [ctypes.c_char_p, ctypes.c_char_p]),
            ("ggml_backend_free", None, [vp]),
            ("ggml_backend_alloc_ctx_tensors", vp, [vp, vp]),
            ("ggml_backend_buffer_free", None, [vp]),
            ("ggml_backend_tensor_set", None, [vp, vp, sz, sz]),
            ("ggml_backend_tensor_get", None, [vp, vp, sz, sz]),
            ("ggml_backend_graph_compute", ctypes.c_int, [vp, vp]),
        ):
            fn = getattr(b, name)
            fn.restype, fn.argtypes = res, args
        self.backend = b.ggml_backend_init_by_name(backend.encode(), None)
        if not self.backend:
            raise HarnessError(f"no ggml backend named {backend!r} in {lib_dir}", "use CPU, or CUDA0 on a CUDA build")
        set_backend_threads(b, self.backend, n_threads)

    def __del__(self) -> None:
        if getattr(self, "backend", None):
            self.lib.ggml_backend_free(self.backend)
            self.backend = None

    def sample(self, logits: np.ndarray, uniforms: np.ndarray, sp: SamplerParams) -> np.ndarray:
        """One token per row of uniforms ([rows, n_uniforms]); every row samples the same logits."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        uniforms = np.ascontiguousarray(uniforms, dtype=np.float32)
        rows, n_u = uniforms.shape
        n = logits.size
        b = self.lib
        ctx = b.ggml_init(InitParams(1 << 20, None, True))
        # every row reads the same logits: a [n, rows] tensor whose rows all point at one backend array (stride 0),
        # made in a context that is never allocated (a ggml view may not be larger than its source)
        ctx_v = b.ggml_init(InitParams(1 << 16, None, True))
        buf = None
        if not ctx or not ctx_v:
            raise HarnessError("ggml_init failed", "free memory")
        try:
            lt = b.ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n)
            rows_view = b.ggml_new_tensor_2d(ctx_v, GGML_TYPE_F32, n, rows)
            ut = b.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_u, rows)
            out = b.ggml_sample_sortfree(ctx, rows_view, ut, sp.temp, sp.top_k, sp.top_p, sp.min_p)
            gf = b.ggml_new_graph(ctx)
            b.ggml_build_forward_expand(gf, out)
            buf = b.ggml_backend_alloc_ctx_tensors(ctx, self.backend)
            if not buf:
                raise HarnessError(f"could not allocate {rows} rows on the backend", "use fewer rows per call")
            src = ctypes.cast(lt, ctypes.POINTER(Tensor)).contents
            t = ctypes.cast(rows_view, ctypes.POINTER(Tensor)).contents
            if (t.type, t.ne[0], t.ne[1], t.nb[0], t.nb[1], t.data) != (GGML_TYPE_F32, n, rows, 4, 4 * n, None):
                raise HarnessError(
                    "struct ggml_tensor does not have the layout this checker expects",
                    "update pyharness.ggml_ctypes.Tensor",
                )
            t.data, t.buffer = src.data, src.buffer
            t.nb[1] = t.nb[2] = t.nb[3] = 0
            b.ggml_backend_tensor_set(lt, logits.ctypes.data, 0, logits.nbytes)
            b.ggml_backend_tensor_set(ut, uniforms.ctypes.data, 0, uniforms.nbytes)
            status = b.ggml_backend_graph_compute(self.backend, gf)
            if status != 0:
                raise HarnessError(f"ggml_backend_graph_compute returned {status}", "see stderr")
            res = np.empty(rows, dtype=np.int32)
            b.ggml_backend_tensor_get(out, res.ctypes.data, 0, res.nbytes)
            return res
        finally:
            if buf:
                b.ggml_backend_buffer_free(buf)
            b.ggml_free(ctx)
            b.ggml_free(ctx_v)

    def draw(self, logits: np.ndarray, sp: SamplerParams, n_samples: int, seed: int, batch: int = 20000) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = []
        for start in range(0, n_samples, batch):
            rows = min(batch, n_samples - start)
            out.append(self.sample(logits, rng.random((rows, N_UNIFORMS), dtype=np.float32), sp))
        return np.concatenate(out)


class SamplerDriver:
    """llama_sampler_init_sortfree + llama_sampler_apply from a build's libllama (the CPU path)."""

    def __init__(self, lib_dir: Path) -> None:
        load_library(lib_dir, "ggml-base")
        load_library(lib_dir, "ggml")
        self.llama = load_library(lib_dir, "llama")
        if not hasattr(self.llama, "llama_sampler_init_sortfree"):
            raise HarnessError(f"{lib_dir}/libllama.so has no llama_sampler_init_sortfree", "use the patched build")
        lib = self.llama
        lib.llama_backend_init.argtypes = []
        lib.llama_backend_init()
        lib.llama_sampler_init_sortfree.restype = ctypes.c_void_p
        lib.llama_sampler_init_sortfree.argtypes = [
            ctypes.c_float,
            ctypes.c_int32,
            ctypes.c_float,
            ctypes.c_float,
            ctypes.c_uint32,
        ]
        lib.llama_sampler_apply.argtypes = [ctypes.c_void_p, ctypes.POINTER(TokenDataArray)]
        lib.llama_sampler_free.argtypes = [ctypes.c_void_p]

    def draw(self, logits: np.ndarray, sp: SamplerParams, n_samples: int, seed: int) -> np.ndarray:
        n = logits.size
        data = (TokenData * n)()
        for i, v in enumerate(np.asarray(logits, dtype=np.float32).tolist()):
            data[i].id, data[i].logit, data[i].p = i, v, 0.0
        arr = TokenDataArray(data, n, -1, False)
        ref = ctypes.byref(arr)
        smpl = self.llama.llama_sampler_init_sortfree(sp.temp, sp.top_k, sp.top_p, sp.min_p, seed)
        apply = self.llama.llama_sampler_apply
        out = np.empty(n_samples, dtype=np.int64)
        try:
            for j in range(n_samples):
                apply(smpl, ref)
                out[j] = data[arr.selected].id
        finally:
            self.llama.llama_sampler_free(smpl)
        return out
