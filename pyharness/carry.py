"""Files larger than what one call to the GPU machine carries, moved there in pieces and put together again.

`split` cuts files into pieces of at most `max_bytes` under a folder and records every piece's and every whole file's
size and sha256 in `manifest.json` there (entries of other files already recorded are kept). `plan` groups the pieces
into calls whose carried bytes stay under a limit. `join`, on the other side, checks every piece against the
manifest, writes each whole file through a temporary file, checks its sha256 and only then renames it into place:
a missing or damaged piece leaves nothing half-written and says which pieces to carry again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyharness.errors import HarnessError
from pyharness.proc import sha256_file

MANIFEST = "manifest.json"
MIB = 1 << 20
_CHUNK = 8 * MIB


@dataclass(frozen=True)
class Piece:
    file: str
    size: int
    sha256: str


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HarnessError(f"{path} is not valid JSON ({exc})", "split the files again") from exc
    if not isinstance(data, dict):
        raise HarnessError(f"{path} is not a manifest of pieces", "split the files again")
    return data


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def split(files: list[Path], out: Path, max_bytes: int) -> dict[str, list[Piece]]:
    """Cut each file into pieces `<name>.partNN` of at most max_bytes under `out`; record them in the manifest."""
    if max_bytes < MIB:
        raise HarnessError(f"pieces of {max_bytes} bytes are too small", "give at least 1 MiB")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise HarnessError("two of the files have the same name", "split them into different folders")
    for f in files:
        if not f.is_file():
            raise HarnessError(f"no file at {f}", "give the path of an existing file")
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    made: dict[str, list[Piece]] = {}
    for f in files:
        for old in out.glob(f"{f.name}.part*"):  # pieces of an earlier split of this name
            old.unlink()
        whole = hashlib.sha256()
        pieces: list[Piece] = []
        with f.open("rb") as src:
            index = 0
            while True:
                data = src.read(max_bytes)
                if not data and index > 0:
                    break
                whole.update(data)
                piece = out / f"{f.name}.part{index:02d}"
                piece.write_bytes(data)
                pieces.append(Piece(piece.name, len(data), hashlib.sha256(data).hexdigest()))
                index += 1
                if len(data) < max_bytes:
                    break
        manifest[f.name] = {
            "size": f.stat().st_size,
            "sha256": whole.hexdigest(),
            "pieces": [p.__dict__ for p in pieces],
        }
        made[f.name] = pieces
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return made


def plan(folder: Path, limit_bytes: int, first_extra: int = 0, tree: int = 0) -> list[list[str]]:
    """The pieces grouped into calls of at most limit_bytes each. Every call carries the working tree (`tree` bytes)
    and the manifest; the first call also carries first_extra bytes of other paths (and the pieces that fit beside
    them)."""
    manifest = read_manifest(folder)
    if not manifest:
        raise HarnessError(f"no {MANIFEST} in {folder}", "run `pyharness carry split` first")
    overhead = (folder / MANIFEST).stat().st_size + tree
    if first_extra + overhead > limit_bytes:
        raise HarnessError(
            f"the first call's other paths ({first_extra / MIB:.1f} MiB) and the working tree ({tree / MIB:.1f} MiB) "
            f"are over the limit of one call ({limit_bytes / MIB:.0f} MiB)",
            "carry fewer paths in the first call",
        )
    # first fit, largest pieces first: the fewest calls in practice (the order of the calls does not matter, `join`
    # runs after the last one)
    calls: list[list[str]] = [[]]
    used = [first_extra + overhead]
    pieces = sorted((p for name in sorted(manifest) for p in manifest[name]["pieces"]), key=lambda p: -p["size"])
    for p in pieces:
        if p["size"] + overhead > limit_bytes:
            raise HarnessError(
                f"piece {p['file']} ({p['size'] / MIB:.1f} MiB) and the working tree ({tree / MIB:.1f} MiB) are "
                f"over the limit of one call ({limit_bytes / MIB:.0f} MiB)",
                "split with smaller pieces (--max-mib)",
            )
        room = next((i for i, u in enumerate(used) if u + p["size"] <= limit_bytes), None)
        if room is None:
            calls.append([])
            used.append(overhead)
            room = len(calls) - 1
        calls[room].append(p["file"])
        used[room] += p["size"]
    return [sorted(call) for call in calls if call or first_extra]


def tree_bytes(root: Path) -> int:
    """Bytes of the working tree that travels with every call (tracked and untracked-not-ignored files); 0 outside
    a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    total = 0
    for name in out.decode().split("\0"):
        path = root / name
        if name and path.is_file():
            total += path.stat().st_size
    return total


def join(folder: Path, out: Path, names: list[str] | None = None) -> list[Path]:
    """Put the manifest's files (or `names` of them) together under `out`, each checked piece by piece and whole."""
    manifest = read_manifest(folder)
    if not manifest:
        raise HarnessError(f"no {MANIFEST} in {folder}", "carry the pieces' folder with its manifest")
    wanted = names or sorted(manifest)
    unknown = [n for n in wanted if n not in manifest]
    if unknown:
        raise HarnessError(f"{', '.join(unknown)} not in {folder / MANIFEST}", f"known: {', '.join(sorted(manifest))}")
    problems: list[str] = []
    for name in wanted:
        for p in manifest[name]["pieces"]:
            path = folder / p["file"]
            if not path.is_file():
                problems.append(f"{p['file']} missing")
            elif path.stat().st_size != p["size"]:
                problems.append(f"{p['file']} has {path.stat().st_size} bytes, not {p['size']}")
            elif sha256_file(path) != p["sha256"]:
                problems.append(f"{p['file']} is damaged (sha256 differs)")
    if problems:
        raise HarnessError("; ".join(problems) + "; nothing was written", "carry those pieces (again), then join")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in wanted:
        entry = manifest[name]
        target = out / name
        if target.is_file() and target.stat().st_size == entry["size"] and sha256_file(target) == entry["sha256"]:
            written.append(target)
            continue
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as dst:
                for p in entry["pieces"]:
                    with (folder / p["file"]).open("rb") as src:
                        while chunk := src.read(_CHUNK):
                            h.update(chunk)
                            dst.write(chunk)
            if h.hexdigest() != entry["sha256"]:
                raise HarnessError(
                    f"{name} put together has sha256 {h.hexdigest()}, the manifest says {entry['sha256']}",
                    "split the file again",
                )
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        written.append(target)
    return written
