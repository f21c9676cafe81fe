"""Greedy generation on several sequences at once, with the standard and the paged KV cache of one build, token for
token (issue 7, item 5). Runs in a process of its own, because llama-cpp-python loads one libllama per process:

    LLAMA_CPP_LIB_PATH=build/patched-cpu/bin python -m pyharness.paged_generation --model M.gguf [--config JSON]

prints one JSON object (see `Generation.as_dict`). Both contexts are driven in lock step through llama-cpp-python's
low-level API (and ctypes for `llama_init_from_model_paged`, which the bindings do not know): the prompts of all
sequences in one batch, then greedy steps whose batch holds one token of each sequence. Each cache follows its own
greedy tokens; while a sequence's tokens are still the same in both, its logits rows are compared too (bitwise, and
the largest absolute difference). End-of-generation tokens do not stop a sequence (every sequence generates
`n_gen` tokens, like `--ignore-eos`).

`pyharness.runners.paged` runs this for the matrix (`kind = "paged-generate"`) and stores the JSON with the run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROMPTS = (
    "The history of the Roman Empire",
    "In mathematics, a prime number is",
    "Robert Boulter is an English film and television actor",
    "The quick brown fox",
)
CACHES = ("standard", "paged")
FLASH_ATTN = {"on": 1, "off": 0, "auto": -1}  # llama_flash_attn_type
PAGED_LOG = "llama_kv_cache_paged"  # the paged cache's log lines (its size); absent when it fell back
FALLBACK_LOG = "paged KV cache not used"


@dataclass
class GenerationConfig:
    """What one generation run does; the defaults are the evaluation's (4 sequences, 256 tokens each)."""

    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    n_gen: int = 256
    ctx: int = 2048
    batch: int = 2048
    ubatch: int = 512
    threads: int = 2
    flash_attn: str = "on"
    page_size: int = 64
    pool_tokens: int = 0  # 0: n_ctx tokens per KV head (the paged cache's default)
    kv_unified: bool = True  # the standard cache: one buffer for every sequence

    def validate(self) -> GenerationConfig:
        problems = []
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            problems.append("prompts must be a non-empty list of non-empty strings")
        if self.n_gen < 1:
            problems.append(f"n_gen must be at least 1, got {self.n_gen}")
        if self.flash_attn not in FLASH_ATTN:
            problems.append(f"flash_attn must be one of {', '.join(FLASH_ATTN)}, got {self.flash_attn!r}")
        for name in ("ctx", "batch", "ubatch", "threads", "page_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def paged_cache_used(log_lines: Sequence[str]) -> bool:
    """Whether llama.cpp's log of a context says it made the paged cache (it logs its size) and did not fall back."""
    return any(PAGED_LOG in ln for ln in log_lines) and not any(FALLBACK_LOG in ln for ln in log_lines)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index at which two token lists differ (the shorter one's length when one is a prefix of the other),
    or None when they are identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class SequenceResult:
    """One sequence under both caches."""

    seq: int
    prompt: str
    prompt_tokens: int
    tokens: dict[str, list[int]]
    text: dict[str, str]
    first_token_difference: int | None = None
    # the first generated token's index whose logits row differed while both caches had fed the same tokens
    first_logits_difference: int | None = None
    max_abs_logit_diff: float = 0.0  # over the rows compared (those with the same tokens fed)
    rows_compared: int = 0


@dataclass
class Generation:
    config: GenerationConfig
    sequences: list[SequenceResult]
    paged_active: bool
    logs: dict[str, list[str]]  # per cache: llama.cpp's log lines about its KV cache
    failed: dict[str, str] = field(default_factory=dict)  # per cache: why decoding stopped early
    library: str = ""  # the libllama this process loaded

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["identical"] = sum(s.first_token_difference is None for s in self.sequences)
        return out


# ------------------------------------------------------------------------------------------------ the worker


class _PagedParams(ctypes.Structure):
    _fields_ = [("page_size", ctypes.c_uint32), ("pool_tokens", ctypes.c_uint32), ("n_obs", ctypes.c_uint32)]


class _Runner:
    """Both contexts of one model, stepped together."""

    def __init__(self, model_path: str, config: GenerationConfig) -> None:
        import llama_cpp

        self.lc = llama_cpp
        self.config = config
        self.log: list[str] = []
        self._log_cb = llama_cpp.llama_log_callback(self._on_log)  # kept referenced while the library may call it
        llama_cpp.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}: {self._last_error()}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def _on_log(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        self.log.append(text.decode("utf-8", errors="replace"))

    def _last_error(self) -> str:
        lines = [ln.strip() for ln in "".join(self.log).splitlines() if ln.strip()]
        return lines[-1] if lines else "no log"

    def context(self, cache: str) -> tuple[Any, list[str]]:
        lc, c = self.lc, self.config
        params = lc.llama_context_default_params()
        params.n_ctx = c.ctx
        params.n_batch = c.batch
        params.n_ubatch = c.ubatch
        params.n_seq_max = len(c.prompts)
        params.n_threads = c.threads
        params.n_threads_batch = c.threads
        params.flash_attn_type = FLASH_ATTN[c.flash_attn]
        params.kv_unified = c.kv_unified
        start = len(self.log)
        if cache == "paged":
            fn = lc.llama_cpp._lib.llama_init_from_model_paged
            fn.argtypes = [ctypes.c_void_p, lc.llama_context_params, _PagedParams]
            fn.restype = ctypes.c_void_p
            ctx = fn(self.model, params, _PagedParams(c.page_size, c.pool_tokens, 0))
        else:
            ctx = lc.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError(f"no {cache} context: {self._last_error()}")
        lines = "".join(self.log[start:]).splitlines()
        kv_lines = [ln for ln in lines if ("kv_cache" in ln and "size" in ln) or FALLBACK_LOG in ln]
        return ctx, kv_lines

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (self.lc.llama_token * (len(data) + 8))()
        n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, False)
        if n < 0:
            raise RuntimeError(f"cannot tokenize {text!r}")
        return list(buf[:n])

    def detokenize(self, tokens: list[int]) -> str:
        out = b""
        buf = ctypes.create_string_buffer(256)
        for tok in tokens:
            n = self.lc.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, False)
            out += buf.raw[: max(n, 0)]
        return out.decode("utf-8", errors="replace")

    def run(self) -> Generation:
        import numpy as np

        lc, c = self.lc, self.config
        prompts = [self.tokenize(p) for p in c.prompts]
        n_seq = len(prompts)
        contexts: dict[str, Any] = {}
        logs: dict[str, list[str]] = {}
        for cache in CACHES:
            contexts[cache], logs[cache] = self.context(cache)
        paged_active = paged_cache_used(logs["paged"])
        size = max(c.batch, sum(len(p) for p in prompts), n_seq)
        batches = {cache: lc.llama_batch_init(size, 0, 1) for cache in CACHES}
        tokens: dict[str, list[list[int]]] = {cache: [[] for _ in range(n_seq)] for cache in CACHES}
        failed: dict[str, str] = {}
        results = [
            SequenceResult(s, c.prompts[s], len(prompts[s]), {k: [] for k in CACHES}, {k: "" for k in CACHES})
            for s in range(n_seq)
        ]

        def decode(cache: str, items: list[tuple[int, int, int]], rows: list[int]) -> list[Any] | None:
            """items: (token, position, sequence); the logits rows of the items at `rows` (None: decode failed)"""
            batch = batches[cache]
            batch.n_tokens = len(items)
            wanted = set(rows)
            for i, (tok, pos, seq) in enumerate(items):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if i in wanted else 0
            rc = lc.llama_decode(contexts[cache], batch)
            if rc != 0:
                failed[cache] = f"llama_decode returned {rc} at generated token {len(tokens[cache][0])}"
                return None
            return [
                np.ctypeslib.as_array(lc.llama_get_logits_ith(contexts[cache], i), shape=(self.n_vocab,)) for i in rows
            ]

        prompt_items = [(t, p, s) for s, toks in enumerate(prompts) for p, t in enumerate(toks)]
        last_rows = [sum(len(t) for t in prompts[: s + 1]) - 1 for s in range(n_seq)]
        rows = {cache: decode(cache, prompt_items, last_rows) for cache in CACHES}
        step = 0
        while True:
            if any(r is None for r in rows.values()):
                break
            for s in range(n_seq):
                row_std, row_pag = rows["standard"][s], rows["paged"][s]  # type: ignore[index]
                res = results[s]
                if tokens["standard"][s] == tokens["paged"][s]:  # the same tokens fed so far: compare the rows
                    res.rows_compared += 1
                    if not np.array_equal(row_std, row_pag):
                        diff = float(np.max(np.abs(row_std.astype(np.float64) - row_pag.astype(np.float64))))
                        res.max_abs_logit_diff = max(res.max_abs_logit_diff, diff)
                        if res.first_logits_difference is None:
                            res.first_logits_difference = step
                for cache, row in (("standard", row_std), ("paged", row_pag)):
                    tokens[cache][s].append(int(np.argmax(row)))
            step += 1
            if step == c.n_gen:
                break
            for cache in CACHES:
                items = [(tokens[cache][s][-1], len(prompts[s]) + step - 1, s) for s in range(n_seq)]
                rows[cache] = decode(cache, items, list(range(n_seq)))
        for cache in CACHES:
            lc.llama_batch_free(batches[cache])
            lc.llama_free(contexts[cache])
        for s, res in enumerate(results):
            for cache in CACHES:
                res.tokens[cache] = tokens[cache][s]
                res.text[cache] = self.detokenize(tokens[cache][s])
            res.first_token_difference = first_difference(res.tokens["standard"], res.tokens["paged"])
        return Generation(c, results, paged_active, logs, failed, loaded_library())

    def close(self) -> None:
        self.lc.llama_model_free(self.model)


def loaded_library() -> str:
    """The path of the libllama.so mapped into this process ("" when none is)."""
    try:
        maps = Path("/proc/self/maps").read_text().split()
    except OSError:
        return ""
    found = sorted({m for m in maps if "/libllama.so" in m})
    return found[0] if found else ""


def generate(model_path: str, config: GenerationConfig) -> Generation:
    runner = _Runner(model_path, config.validate())
    try:
        return runner.run()
    finally:
        runner.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyharness.paged_generation", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a .gguf file")
    ap.add_argument("--config", default="{}", help="GenerationConfig fields as JSON (default: the evaluation's)")
    args = ap.parse_args(argv)
    try:
        config = GenerationConfig(**json.loads(args.config)).validate()
    except (TypeError, ValueError) as exc:
        print(f"paged_generation: bad --config: {exc}", file=sys.stderr)
        return 2
    try:
        result = generate(args.model, config)
    except ImportError as exc:
        print(f"paged_generation: {exc}; install llama-cpp-python 0.3.36 without its own llama.cpp", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as exc:
        print(f"paged_generation: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.as_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
