"""Synthetic GGUFs: shapes, tokenizer, data, determinism, atomic writes, and loading with llama-bench."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from pyharness import models, synth
from pyharness.errors import HarnessError
from pyharness.proc import sha256_file

REPO = Path(__file__).resolve().parent.parent
TINY = ["llama-tiny", "gemma3-tiny"]


@pytest.fixture(scope="session")
def llama_bench() -> Path:
    """The upstream CPU llama-bench: $PYHARNESS_LLAMA_BENCH, else build/upstream-cpu/bin/llama-bench."""
    env = os.environ.get("PYHARNESS_LLAMA_BENCH")
    path = Path(env) if env else REPO / "build" / "upstream-cpu" / "bin" / "llama-bench"
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"llama-bench not found at {path}: build the upstream CPU variant (build/upstream-cpu) "
            "or set PYHARNESS_LLAMA_BENCH to a llama-bench binary"
        )
    return path


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    out = tmp_path_factory.mktemp("synth")
    return {
        (shape, ftype): synth.write_synthetic(shape, out, ftype=ftype, seed=7, progress=False)
        for shape in TINY
        for ftype in synth.FTYPES
    }


def _fields(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("ftype", ["q4_0", "f16"])
@pytest.mark.parametrize("shape", TINY)
def test_tiny_file_has_the_shape(tiny_files: dict[tuple[str, str], Path], shape: str, ftype: str) -> None:
    path = tiny_files[(shape, ftype)]
    s = synth.SHAPES[shape]
    assert path.name == f"synth-{shape}-{ftype}.gguf"
    reader = gguf.GGUFReader(path)
    f = _fields(reader)
    arch = s.architecture
    assert f["general.architecture"] == arch
    assert f["general.name"] == f"pyharness-synth-{shape}"
    assert f["pyharness.synth.seed"] == 7
    assert f["general.file_type"] == int(synth.FTYPES[ftype])
    assert f[f"{arch}.block_count"] == s.n_layer
    assert f[f"{arch}.embedding_length"] == s.n_embd
    assert f[f"{arch}.attention.head_count"] == s.n_head
    assert f[f"{arch}.attention.head_count_kv"] == s.n_head_kv
    assert f[f"{arch}.attention.key_length"] == f[f"{arch}.attention.value_length"] == s.head_dim
    assert f[f"{arch}.feed_forward_length"] == s.n_ff

    tensors = {t.name: t for t in reader.tensors}
    expected = synth.plan_tensors(s, ftype)
    assert [t.name for t in reader.tensors] == [t.name for t in expected]
    for t in expected:
        got = tensors[t.name]
        assert tuple(int(d) for d in got.shape) == t.ne, t.name
        assert got.tensor_type == t.qtype, t.name
    hd, nq, nkv = s.head_dim, s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    assert tuple(tensors["blk.0.attn_q.weight"].shape) == (s.n_embd, nq)
    assert tuple(tensors["blk.0.attn_k.weight"].shape) == (s.n_embd, nkv)
    assert tuple(tensors["blk.0.attn_output.weight"].shape) == (nq, s.n_embd)
    assert tuple(tensors["blk.1.ffn_down.weight"].shape) == (s.n_ff, s.n_embd)
    if arch == "gemma3":
        assert hd == 256
        assert tuple(tensors["blk.0.attn_q_norm.weight"].shape) == (hd,)
        assert "blk.1.post_ffw_norm.weight" in tensors and "output.weight" not in tensors
        assert f["gemma3.attention.sliding_window"] == s.sliding_window
    else:
        assert "output.weight" in tensors

    # tokenizer: distinct tokens, as many as embedding rows, specials and byte fallback present
    tokens = f["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list)
    assert len(tokens) == len(set(tokens)) == s.n_vocab == int(tensors["token_embd.weight"].shape[1])
    assert len(f["tokenizer.ggml.scores"]) == len(f["tokenizer.ggml.token_type"]) == s.n_vocab
    assert f["tokenizer.ggml.model"] == "llama"
    assert tokens[f["tokenizer.ggml.bos_token_id"]] in ("<s>", "<bos>")
    assert tokens[f["tokenizer.ggml.eos_token_id"]] in ("</s>", "<eos>")
    assert "<0x0A>" in tokens and "<0xFF>" in tokens
    types = f["tokenizer.ggml.token_type"]
    assert sum(1 for t in types if t == gguf.TokenType.BYTE) == 256

    # our header reader sees the same thing, and the model passes the harness's own checks
    info = models.inspect_gguf(path)
    assert (info["layers"], info["head_dim"], info["vocab_size"], info["embedding_rows"]) == (
        s.n_layer, s.head_dim, s.n_vocab, s.n_vocab,
    )  # fmt: skip
    models.check_supported(info)


@pytest.mark.parametrize("shape", TINY)
def test_weights_are_finite_and_scaled(tiny_files: dict[tuple[str, str], Path], shape: str) -> None:
    seen = set()
    for ftype in synth.FTYPES:
        reader = gguf.GGUFReader(tiny_files[(shape, ftype)])
        for t in reader.tensors:
            w = dequantize(t.data, t.tensor_type).astype(np.float64)
            assert np.isfinite(w).all(), t.name
            if "norm" in t.name:
                assert np.allclose(w, 1.0, atol=0.03), t.name
            elif t.name.endswith(".weight"):
                rms = math.sqrt(float((w**2).mean()))
                target = 1 / math.sqrt(int(t.shape[0]))
                assert 0.6 * target < rms < 1.5 * target, (t.name, t.tensor_type.name, rms, target)
                seen.add(t.tensor_type)
    assert {gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.F16} <= seen


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = synth.write_synthetic("llama-tiny", tmp_path / "a.gguf", seed=1, progress=False)
    b = synth.write_synthetic("llama-tiny", tmp_path / "b.gguf", seed=1, progress=False)
    c = synth.write_synthetic("llama-tiny", tmp_path / "c.gguf", seed=2, progress=False)
    assert sha256_file(a) == sha256_file(b) != sha256_file(c)
    assert a.stat().st_size == c.stat().st_size


def test_n_layers_override(tmp_path: Path) -> None:
    path = synth.write_synthetic("gemma3-tiny", tmp_path, n_layers=7, progress=False)
    assert path.name == "synth-gemma3-tiny-7l-q4_0.gguf"
    info = models.inspect_gguf(path)
    assert info["layers"] == 7 and info["n_embd"] == 256
    assert sum(1 for n in models.read_gguf_header(path).tensors if n.name.endswith("post_ffw_norm.weight")) == 7
    with pytest.raises(HarnessError, match="at least 1"):
        synth.write_synthetic("gemma3-tiny", tmp_path, n_layers=0, progress=False)


def test_real_shapes_plan() -> None:
    """The big shapes' tensor tables (not written here: GBs) follow the models' configs."""
    plans = {name: {t.name: t for t in synth.plan_tensors(synth.SHAPES[name], "q4_0")} for name in synth.SHAPES}
    q6k, q40 = gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.Q4_0
    llama = plans["llama3-8b"]
    assert llama["token_embd.weight"].ne == (4096, 128256) and llama["token_embd.weight"].qtype == q40
    assert llama["output.weight"].qtype == q6k
    assert llama["blk.31.attn_k.weight"].ne == (4096, 1024)
    assert llama["blk.0.ffn_down.weight"].ne == (14336, 4096)
    # ~4.65 GB of tensor data, like llama-quantize's Q4_0 of Llama 3 8B
    assert 4.5e9 < synth.synthetic_size("llama3-8b") < 4.8e9
    qwen = plans["qwen2.5-7b"]
    assert qwen["blk.27.attn_q.bias"].ne == (3584,) and qwen["blk.0.attn_v.bias"].ne == (512,)
    assert qwen["blk.0.ffn_up.weight"].ne == (3584, 18944) and qwen["output.weight"].ne == (3584, 152064)
    gemma = plans["gemma3-27b"]
    assert "output.weight" not in gemma and gemma["token_embd.weight"].qtype == q6k
    assert gemma["token_embd.weight"].ne == (5376, 262208)
    assert gemma["blk.61.attn_q.weight"].ne == (5376, 32 * 256)
    assert gemma["blk.61.attn_k.weight"].ne == (5376, 16 * 256)
    assert gemma["blk.61.attn_output.weight"].ne == (32 * 256, 5376)
    assert gemma["blk.61.attn_k_norm.weight"].ne == (256,)
    assert gemma["blk.0.ffn_gate.weight"].ne == (5376, 21504)
    assert synth.SHAPES["gemma3-27b"].sliding_window == 1024 and synth.SHAPES["gemma3-27b"].swa_pattern == 6


def test_vocab_builder() -> None:
    tokens, scores, types = synth.build_vocab(152064, "qwen2")
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == 152064
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 10] == "<0x0A>"
    assert all(t for t in tokens)
    g_tokens, _, g_types = synth.build_vocab(1024, "gemma3")
    assert g_tokens[:4] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert g_types[3] == gguf.TokenType.UNKNOWN and g_types[2] == gguf.TokenType.CONTROL
    with pytest.raises(HarnessError, match="too small"):
        synth.build_vocab(100, "llama")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="unknown synthetic shape"):
        synth.write_synthetic("llama-70b", tmp_path, progress=False)
    with pytest.raises(HarnessError, match="unknown file type"):
        synth.write_synthetic("llama-tiny", tmp_path, ftype="q8_k", progress=False)


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synth._fill_chunk
    calls = []

    def flaky(t: Any, rows: int, seed: int, ti: int, ci: int) -> np.ndarray:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(t, rows, seed, ti, ci)

    monkeypatch.setattr(synth, "_fill_chunk", flaky)
    out = tmp_path / "x.gguf"
    with pytest.raises(KeyboardInterrupt):
        synth.write_synthetic("llama-tiny", out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_progress_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synth.write_synthetic("llama-tiny", tmp_path / "p.gguf", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "synth llama-tiny q4_0" in captured.err


@pytest.mark.parametrize("shape", TINY)
def test_llama_bench_loads_and_runs(llama_bench: Path, tiny_files: dict[tuple[str, str], Path], shape: str) -> None:
    path = tiny_files[(shape, "q4_0")]
    proc = subprocess.run(
        [str(llama_bench), "-m", str(path), "-p", "16", "-n", "4", "-r", "1", "-t", "2", "-o", "jsonl"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [(16, 0), (0, 4)]
    arch = synth.SHAPES[shape].architecture
    for r in rows:
        assert r["model_type"].startswith(f"{arch} ") and r["model_type"].endswith("Q4_0")
        assert r["model_n_params"] == models.inspect_gguf(path)["parameters"]
        assert r["avg_ts"] > 0 and math.isfinite(r["avg_ts"])
