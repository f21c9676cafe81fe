"""Evaluation text (wikitext-2 raw, test split) and cached file hashes.

The text is, in order: `--text FILE`; `$PYHARNESS_TEXT`; a copy fetched earlier into the cache; the shared copy
beside the checkout (`<project_root>/../shared/data/wikitext-2-raw/wiki.test.raw`); the Hugging Face `datasets`
package (`wikitext`, `wikitext-2-raw-v1`, split `test`), written once into the cache. When none works the error says
how to supply the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pyharness import paths
from pyharness.errors import HarnessError
from pyharness.proc import sha256_file

TEXT_ENV = "PYHARNESS_TEXT"
WIKITEXT_NAME = "wiki.test.raw"
# sha256 of llama.cpp's wikitext-2-raw/wiki.test.raw (ggml-org/ci wikitext-2-raw-v1.zip), as the tests use it
WIKITEXT_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
HOW_TO_SUPPLY = (
    "pass --text FILE or set PYHARNESS_TEXT to wikitext-2-raw/wiki.test.raw (from "
    "https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip), "
    "or `pip install datasets` with network access"
)


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (resolved path, size, mtime) in the cache so large files are hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    index = paths.cache_dir() / "sha256-index.json"
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        known: dict[str, str] = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = sha256_file(path)
    # drop stale entries for the same path, then write atomically (concurrent writers only lose entries)
    known = {k: v for k, v in known.items() if not k.startswith(f"{path}|")}
    known[key] = digest
    tmp = index.with_name(f"{index.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
    tmp.replace(index)
    return digest


def shared_text() -> Path | None:
    try:
        root = paths.project_root()
    except HarnessError:
        return None
    candidate = root.parent / "shared" / "data" / "wikitext-2-raw" / WIKITEXT_NAME
    return candidate if candidate.is_file() else None


def cached_text() -> Path:
    return paths.cache_dir() / "text" / "wikitext-2-raw-v1-test.raw"


def fetch_wikitext(dest: Path) -> Path:
    """Write the wikitext-2-raw-v1 test split from `datasets` to `dest` (the rows joined as they are)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise HarnessError(
            "no evaluation text found, and the `datasets` package is not installed", HOW_TO_SUPPLY
        ) from exc
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # network, hub or cache errors all mean the same thing here
        raise HarnessError(f"could not load wikitext-2-raw-v1 through datasets: {exc}", HOW_TO_SUPPLY) from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text("".join(row["text"] for row in rows), encoding="utf-8")
    tmp.replace(dest)
    return dest


def resolve_text(text: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """The evaluation text file to use (see the module docstring for the order)."""
    if text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise HarnessError(f"text file {path} does not exist", HOW_TO_SUPPLY)
        return path.resolve()
    env = os.environ.get(TEXT_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise HarnessError(f"{TEXT_ENV}={env} is not a file", HOW_TO_SUPPLY)
        return path.resolve()
    cached = cached_text()
    if cached.is_file():
        return cached
    shared = shared_text()
    if shared:
        return shared.resolve()
    if not download:
        raise HarnessError("no evaluation text found", HOW_TO_SUPPLY)
    return fetch_wikitext(cached)
