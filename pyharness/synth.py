"""Random-weight GGUF files with the exact tensor shapes of real models, loadable by every llama.cpp tool.

Benchmarks of kernels and memory traffic depend on the shapes and quantization types of the tensors,
not on their values, so a synthetic file stands in for a multi-GB download. The weights are random but
sized so that activations and logits stay finite (each matrix has an RMS of 1/sqrt(row length)); the
outputs are of course meaningless: logits come out with an RMS of about 1, so perplexities land at 1.5-3x the
vocabulary size (measured: 1.8k for a 1024-token vocabulary, 263k for llama3-8b, 344k for gemma3-27b).

Tensor types follow what `llama-quantize` produces for the chosen file type:
  q4_0: every 2D weight Q4_0, except the output matrix (the token embedding when they are tied, as in
        gemma3), which is Q6_K (Q8_0 where its row length is not a multiple of 256) -- llama-quantize's
        default for Q4_0; norms and biases F32.
  f16:  every 2D weight F16; norms and biases F32.
Quantized blocks are written directly (random quants plus a small finite f16 scale per block), so no
quantization runs and a 4.5 GB file takes seconds, generated on all cores in fixed-size chunks whose
random streams depend only on (seed, tensor, chunk): the same seed gives the same bytes.

The tokenizer is a SentencePiece-style ("llama") vocabulary: the arch's special tokens, the 256
byte-fallback tokens <0x00>..<0xFF>, then distinct pieces ("▁" and the printable ASCII characters,
then every string of 2, 3, 4 ... characters over "▁" + the lowercase letters) so text tokenizes into
multi-character tokens, up to the vocabulary size of the shape (which equals the embedding rows).
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from pyharness.errors import HarnessError

QT = gguf.GGMLQuantizationType
FTYPES: dict[str, gguf.LlamaFileType] = {
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
}
_CHUNK_BYTES = 16 << 20  # generation unit: also the determinism unit, do not change lightly
_SPIECE_SPACE = "\u2581"  # "▁"


@dataclass(frozen=True)
class SynthShape:
    """The hyperparameters of a model, as llama.cpp reads them from GGUF metadata."""

    name: str
    architecture: str  # llama | qwen2 | gemma3
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    context_length: int
    rope_theta: float
    rms_eps: float
    qkv_bias: bool = False  # qwen2: q/k/v projections have biases
    tied_embeddings: bool = False  # no output.weight: the token embedding is the output matrix
    sliding_window: int = 0  # gemma3: local attention window
    swa_pattern: int = 0  # gemma3: every n-th layer is global, the others local (6 -> 5 local : 1 global)
    rope_scaling: tuple[str, float] | None = None  # (type, factor) of the global rope
    source: str = ""

    @property
    def n_embd_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim


SHAPES: dict[str, SynthShape] = {
    # meta-llama/Meta-Llama-3-8B config.json: hidden_size 4096, num_hidden_layers 32, num_attention_heads 32,
    # num_key_value_heads 8, intermediate_size 14336, vocab_size 128256, rope_theta 500000,
    # rms_norm_eps 1e-5, max_position_embeddings 8192 (Llama 3.0: no llama3 rope-scaling factors tensor).
    "llama3-8b": SynthShape(
        name="llama3-8b",
        architecture="llama",
        n_layer=32,
        n_embd=4096,
        n_head=32,
        n_head_kv=8,
        head_dim=128,
        n_ff=14336,
        n_vocab=128256,
        context_length=8192,
        rope_theta=500000.0,
        rms_eps=1e-5,
        source="meta-llama/Meta-Llama-3-8B config.json",
    ),
    # Qwen/Qwen2.5-7B config.json: hidden_size 3584, num_hidden_layers 28, num_attention_heads 28,
    # num_key_value_heads 4, intermediate_size 18944, vocab_size 152064, rope_theta 1e6, rms_norm_eps 1e-6,
    # max_position_embeddings 32768 (131072 with YaRN), tie_word_embeddings false; q/k/v have biases.
    "qwen2.5-7b": SynthShape(
        name="qwen2.5-7b",
        architecture="qwen2",
        n_layer=28,
        n_embd=3584,
        n_head=28,
        n_head_kv=4,
        head_dim=128,
        n_ff=18944,
        n_vocab=152064,
        context_length=32768,
        rope_theta=1000000.0,
        rms_eps=1e-6,
        qkv_bias=True,
        source="Qwen/Qwen2.5-7B config.json",
    ),
    # google/gemma-3-27b-it text_config: hidden_size 5376, num_hidden_layers 62, num_attention_heads 32,
    # num_key_value_heads 16, intermediate_size 21504, vocab_size 262208, sliding_window 1024 with
    # sliding_window_pattern 6 (5 local : 1 global), rope_theta 1e6 (global; local 10000 = llama.cpp's
    # default freq_base_swa), rope_scaling linear x8, max_position_embeddings 131072, rms_norm_eps 1e-6,
    # tied embeddings. DEVIATION: head_dim is 256 (as gemma3 270m/1b/4b/12b), not the 27b's 128, as the
    # issue asks for a "gemma3-27b-like head dim 256" shape: Q is 32*256 = 8192 wide, K/V 16*256 = 4096.
    # gemma3 needs attn_q_norm/attn_k_norm, post_attention_norm and post_ffw_norm; it has no attention
    # logit softcapping and the 27b no final logit softcapping either (llama.cpp defaults both to off).
    "gemma3-27b": SynthShape(
        name="gemma3-27b",
        architecture="gemma3",
        n_layer=62,
        n_embd=5376,
        n_head=32,
        n_head_kv=16,
        head_dim=256,
        n_ff=21504,
        n_vocab=262208,
        context_length=131072,
        rope_theta=1000000.0,
        rms_eps=1e-6,
        tied_embeddings=True,
        sliding_window=1024,
        swa_pattern=6,
        rope_scaling=("linear", 8.0),
        source="google/gemma-3-27b-it config.json (head_dim 256 instead of 128, see comment)",
    ),
    # test shapes: a few MB, written in well under a second
    "llama-tiny": SynthShape(
        name="llama-tiny",
        architecture="llama",
        n_layer=2,
        n_embd=256,
        n_head=4,
        n_head_kv=2,
        head_dim=64,
        n_ff=512,
        n_vocab=1024,
        context_length=2048,
        rope_theta=10000.0,
        rms_eps=1e-5,
        source="test shape",
    ),
    "gemma3-tiny": SynthShape(
        name="gemma3-tiny",
        architecture="gemma3",
        n_layer=2,
        n_embd=256,
        n_head=2,
        n_head_kv=1,
        head_dim=256,
        n_ff=512,
        n_vocab=1024,
        context_length=2048,
        rope_theta=1000000.0,
        rms_eps=1e-6,
        tied_embeddings=True,
        sliding_window=128,
        swa_pattern=6,
        source="test shape (gemma3 layout, head dim 256)",
    ),
}


# --------------------------------------------------------------------------------------------
# tokenizer


@dataclass(frozen=True)
class _Specials:
    tokens: tuple[str, ...]
    bos: int
    eos: int
    unk: int
    pad: int | None
    add_space_prefix: bool


_SPECIALS: dict[str, _Specials] = {
    # the llama 1/2 SentencePiece layout
    "llama": _Specials(("<unk>", "<s>", "</s>"), bos=1, eos=2, unk=0, pad=None, add_space_prefix=True),
    # gemma3's layout (pad 0, eos 1, bos 2, unk 3), which also turns off the space prefix
    "gemma3": _Specials(("<pad>", "<eos>", "<bos>", "<unk>"), bos=2, eos=1, unk=3, pad=0, add_space_prefix=False),
}


def _specials(arch: str) -> _Specials:
    return _SPECIALS.get(arch, _SPECIALS["llama"])


def build_vocab(n_vocab: int, arch: str) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of an SPM vocabulary of exactly `n_vocab` entries."""
    sp = _specials(arch)
    tokens: list[str] = list(sp.tokens)
    types: list[int] = [int(gguf.TokenType.CONTROL)] * len(tokens)
    types[sp.unk] = int(gguf.TokenType.UNKNOWN)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [int(gguf.TokenType.BYTE)] * 256
    n_pieces = n_vocab - len(tokens)
    if n_pieces < 0:
        raise HarnessError(f"vocabulary size {n_vocab} is too small", f"use at least {len(tokens)} tokens")
    tokens += itertools.islice(_pieces(), n_pieces)
    types += [int(gguf.TokenType.NORMAL)] * n_pieces
    # SentencePiece scores are log-probabilities: rarer (later, longer) pieces score lower
    scores = [0.0] * (n_vocab - n_pieces) + [-float(i) for i in range(1, n_pieces + 1)]
    return tokens, scores, types


def _pieces() -> Iterator[str]:
    yield _SPIECE_SPACE
    yield from (chr(c) for c in range(33, 127))
    alphabet = _SPIECE_SPACE + "etaoinshrdlcumwfgypbvkjxqz"
    for length in itertools.count(2):
        for combo in itertools.product(alphabet, repeat=length):
            yield "".join(combo)


# --------------------------------------------------------------------------------------------
# tensor plan


@dataclass(frozen=True)
class _Tensor:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    qtype: gguf.GGMLQuantizationType
    kind: str  # weight | norm | bias

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.ne) // block * size

    @property
    def row_bytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.ne[0] // block * size


def _weight_type(ftype: str, ne0: int, *, is_output: bool) -> gguf.GGMLQuantizationType:
    if ftype == "f16":
        return QT.F16
    if is_output:
        return QT.Q6_K if ne0 % 256 == 0 else QT.Q8_0
    return QT.Q4_0


def plan_tensors(shape: SynthShape, ftype: str) -> list[_Tensor]:
    """The tensors llama.cpp's loader for `shape.architecture` requires, with their types."""
    s = shape
    out: list[_Tensor] = []

    def weight(name: str, ne0: int, ne1: int, *, is_output: bool = False) -> None:
        out.append(_Tensor(name, (ne0, ne1), _weight_type(ftype, ne0, is_output=is_output), "weight"))

    def vec(name: str, n: int, kind: str) -> None:
        out.append(_Tensor(name, (n,), QT.F32, kind))

    weight("token_embd.weight", s.n_embd, s.n_vocab, is_output=s.tied_embeddings)
    vec("output_norm.weight", s.n_embd, "norm")
    if not s.tied_embeddings:
        weight("output.weight", s.n_embd, s.n_vocab, is_output=True)
    for i in range(s.n_layer):
        b = f"blk.{i}."
        vec(b + "attn_norm.weight", s.n_embd, "norm")
        weight(b + "attn_q.weight", s.n_embd, s.n_embd_q)
        weight(b + "attn_k.weight", s.n_embd, s.n_embd_kv)
        weight(b + "attn_v.weight", s.n_embd, s.n_embd_kv)
        if s.qkv_bias:
            vec(b + "attn_q.bias", s.n_embd_q, "bias")
            vec(b + "attn_k.bias", s.n_embd_kv, "bias")
            vec(b + "attn_v.bias", s.n_embd_kv, "bias")
        if s.architecture == "gemma3":
            vec(b + "attn_q_norm.weight", s.head_dim, "norm")
            vec(b + "attn_k_norm.weight", s.head_dim, "norm")
        weight(b + "attn_output.weight", s.n_embd_q, s.n_embd)
        if s.architecture == "gemma3":
            vec(b + "post_attention_norm.weight", s.n_embd, "norm")
        vec(b + "ffn_norm.weight", s.n_embd, "norm")
        weight(b + "ffn_gate.weight", s.n_embd, s.n_ff)
        weight(b + "ffn_up.weight", s.n_embd, s.n_ff)
        weight(b + "ffn_down.weight", s.n_ff, s.n_embd)
        if s.architecture == "gemma3":
            vec(b + "post_ffw_norm.weight", s.n_embd, "norm")
    for t in out:
        block = gguf.GGML_QUANT_SIZES[t.qtype][0]
        if t.ne[0] % block:
            raise HarnessError(
                f"shape {s.name}: {t.name} row length {t.ne[0]} is not a multiple of {t.qtype.name}'s block {block}",
                "use ftype f16 or a width that is a multiple of 32",
            )
    return out


# --------------------------------------------------------------------------------------------
# random data


def _f16_bits(x: float) -> int:
    return int(np.array(x, dtype="<f2").view("<u2"))


def _jittered_scales(rand16: np.ndarray, base: float) -> np.ndarray:
    """f16 bit patterns of `base` scaled by up to +6% (random mantissa bump): finite, positive, small."""
    return (np.uint16(_f16_bits(base)) + (rand16 & np.uint16(0x3F))).astype("<u2")


def _fill_chunk(t: _Tensor, n_rows: int, seed: int, t_index: int, c_index: int) -> np.ndarray:
    """The bytes of `n_rows` rows of tensor `t`: chunk `c_index` of tensor `t_index`, deterministic."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, t_index, c_index])))
    nbytes = n_rows * t.row_bytes
    target = 1.0 / math.sqrt(t.ne[0])  # RMS of a weight: keeps W @ x at the scale of x
    if t.kind == "norm":
        return (1.0 + rng.uniform(-0.02, 0.02, n_rows * t.ne[0])).astype("<f4").view(np.uint8)
    if t.kind == "bias":
        return rng.normal(0.0, 0.02, n_rows * t.ne[0]).astype("<f4").view(np.uint8)
    raw = rng.bit_generator.random_raw(-(-nbytes // 8)).view(np.uint8)[:nbytes]
    if t.qtype == QT.F16:
        # sign and mantissa random, exponent spread over 4 octaves: |w| log-uniform in [2^e, 2^(e+4))
        bits = raw.view("<u2")
        rms_unit = 7.04  # RMS of that distribution for e = 0, in units of 2^e
        exp = int(np.clip(round(15 + math.log2(target / rms_unit)), 1, 26))
        bits &= np.uint16(0x8FFF)  # sign, 2 random exponent bits (of 5), mantissa
        bits += np.uint16(exp << 10)
        return raw
    if t.qtype == QT.Q4_0:  # {f16 d; u8 qs[16]}: w = d * (q - 8), q uniform 0..15 -> RMS 4.64 d
        blocks = raw.reshape(-1, 18)
        blocks[:, :2] = (
            _jittered_scales(blocks[:, :2].copy().view("<u2")[:, 0], target / 4.64).view(np.uint8).reshape(-1, 2)
        )
        return raw
    if t.qtype == QT.Q8_0:  # {f16 d; i8 qs[32]}: w = d * q, q uniform -128..127 -> RMS 73.9 d
        blocks = raw.reshape(-1, 34)
        blocks[:, :2] = (
            _jittered_scales(blocks[:, :2].copy().view("<u2")[:, 0], target / 73.9).view(np.uint8).reshape(-1, 2)
        )
        return raw
    if t.qtype == QT.Q6_K:  # {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: w = d * scale * (q - 32)
        blocks = raw.reshape(-1, 210)
        blocks[:, 192:208] = (blocks[:, 192:208] & np.uint8(7)) + np.uint8(1)  # scales 1..8, RMS 5.05
        blocks[:, 208:210] = (
            _jittered_scales(blocks[:, 208:210].copy().view("<u2")[:, 0], target / (18.48 * 5.05))
            .view(np.uint8)
            .reshape(-1, 2)
        )
        return raw
    raise AssertionError(f"no generator for {t.qtype.name}")


def _chunks(t: _Tensor) -> list[int]:
    """Rows per chunk of a tensor (the last chunk may be shorter)."""
    rows = math.prod(t.ne[1:])
    per = max(1, _CHUNK_BYTES // t.row_bytes)
    return [min(per, rows - r) for r in range(0, rows, per)]


# --------------------------------------------------------------------------------------------
# writing


def _add_metadata(w: gguf.GGUFWriter, s: SynthShape, ftype: str, seed: int) -> None:
    w.add_name(f"pyharness-synth-{s.name}")
    w.add_type("model")
    w.add_description(f"random weights in the shape of {s.name} ({s.source}); not a usable model")
    w.add_file_type(int(FTYPES[ftype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string("pyharness.synth.shape", s.name)
    w.add_uint64("pyharness.synth.seed", seed)
    w.add_string("pyharness.synth.ftype", ftype)
    w.add_uint32("pyharness.synth.n_layer_full", SHAPES[s.name].n_layer if s.name in SHAPES else s.n_layer)

    w.add_context_length(s.context_length)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_rope_freq_base(s.rope_theta)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    if s.architecture == "llama":
        w.add_rope_dimension_count(s.head_dim)
        w.add_vocab_size(s.n_vocab)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
        w.add_sliding_window_pattern(s.swa_pattern)
    if s.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(s.rope_scaling[0]))
        w.add_rope_scaling_factor(s.rope_scaling[1])

    sp = _specials(s.architecture)
    tokens, scores, types = build_vocab(s.n_vocab, s.architecture)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos)
    w.add_eos_token_id(sp.eos)
    w.add_unk_token_id(sp.unk)
    if sp.pad is not None:
        w.add_pad_token_id(sp.pad)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(sp.add_space_prefix)


def resolve_shape(shape: str, n_layers: int | None = None) -> SynthShape:
    try:
        s = SHAPES[shape]
    except KeyError:
        raise HarnessError(f"unknown synthetic shape {shape!r}", f"use one of {', '.join(SHAPES)}") from None
    if n_layers is not None:
        if n_layers < 1:
            raise HarnessError(f"--n-layers {n_layers} must be at least 1", "give a positive layer count")
        s = replace(s, n_layer=n_layers)
    return s


def default_filename(shape: str, ftype: str, n_layers: int | None = None) -> str:
    layers = f"-{n_layers}l" if n_layers is not None else ""
    return f"synth-{shape}{layers}-{ftype}.gguf"


def synthetic_size(shape: str, *, ftype: str = "q4_0", n_layers: int | None = None) -> int:
    """Bytes of tensor data the file will hold (the header adds a few MB for the vocabulary)."""
    return sum(t.nbytes for t in plan_tensors(resolve_shape(shape, n_layers), ftype))


def write_synthetic(
    shape: str,
    out: Path,
    *,
    ftype: str = "q4_0",
    n_layers: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a random-weight GGUF of `shape` to `out` (a file, or a folder to put a default-named file in).

    The file is written under a temporary name next to `out` and renamed when complete.
    """
    ftype = ftype.lower()
    if ftype not in FTYPES:
        raise HarnessError(f"unknown file type {ftype!r}", f"use one of {', '.join(FTYPES)}")
    if seed < 0:
        raise HarnessError(f"seed {seed} is negative", "use a seed >= 0")
    s = resolve_shape(shape, n_layers)
    out = Path(out)
    if out.is_dir():
        out = out / default_filename(shape, ftype, n_layers)
    tensors = plan_tensors(s, ftype)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessError(f"cannot create {out.parent}: {exc.strerror}", "choose a writable output path") from exc
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        _write(tmp, s, tensors, ftype, seed, progress)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HarnessError(f"writing {out} failed: {exc}", "check free disk space and permissions") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _write(path: Path, s: SynthShape, tensors: list[_Tensor], ftype: str, seed: int, progress: bool) -> None:
    w = gguf.GGUFWriter(path, s.architecture)
    try:
        _add_metadata(w, s, ftype, seed)
        for t in tensors:
            # GGUFWriter takes numpy-order shapes (reversed ggml ne) and writes them back in ggml order
            w.add_tensor_info(t.name, tuple(reversed(t.ne)), np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        total = sum(t.nbytes for t in tensors)
        with _Progress(total, f"synth {s.name} {ftype}", enabled=progress) as bar:
            for block in _generate(tensors, seed):
                fout.write(block.data)
                bar.update(block.nbytes)
        fout.flush()
        os.fsync(fout.fileno())
    finally:
        w.close()


def _generate(tensors: list[_Tensor], seed: int) -> Iterator[np.ndarray]:
    """Tensor data in file order, each tensor followed by its alignment padding; chunks made in parallel."""
    jobs: list[Callable[[], np.ndarray]] = []
    for ti, t in enumerate(tensors):
        jobs += [_bind(t, rows, seed, ti, ci) for ci, rows in enumerate(_chunks(t))]
        pad = gguf.GGUFWriter.ggml_pad(t.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT) - t.nbytes
        if pad:
            jobs.append(_zeros(pad))
    workers = max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth") as pool:
        it = iter(jobs)
        pending: deque[Future[np.ndarray]] = deque(pool.submit(job) for job in itertools.islice(it, 2 * workers))
        while pending:
            block = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(nxt))
            yield block


def _zeros(n: int) -> Callable[[], np.ndarray]:
    return lambda: np.zeros(n, dtype=np.uint8)


def _bind(t: _Tensor, rows: int, seed: int, ti: int, ci: int) -> Callable[[], np.ndarray]:
    return lambda: _fill_chunk(t, rows, seed, ti, ci)


class _Progress:
    """tqdm on stderr when enabled and available, else nothing."""

    def __init__(self, total: int, desc: str, *, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, mininterval=0.5)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)
