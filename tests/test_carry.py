"""`pyharness carry`: files cut into pieces for the GPU machine and put together there, checked at every step."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from pyharness import carry
from pyharness.cli import main
from pyharness.errors import HarnessError


def random_file(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(hashlib.shake_256(str(seed).encode()).digest(size))
    return path


def test_split_plan_and_join_give_back_the_same_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    a = random_file(src / "a.gguf", 5 * carry.MIB + 123, 1)
    b = random_file(src / "b.gguf", 2 * carry.MIB, 2)  # exactly two pieces, no empty third
    pieces = tmp_path / "pieces"
    made = carry.split([a, b], pieces, 1 * carry.MIB)
    assert [p.size for p in made["a.gguf"]] == [carry.MIB] * 5 + [123]
    assert [p.file for p in made["b.gguf"]] == ["b.gguf.part00", "b.gguf.part01"]
    calls = carry.plan(pieces, int(2.5 * carry.MIB))
    assert sorted(f for call in calls for f in call) == sorted(p.file for ps in made.values() for p in ps)
    size = {p.file: p.size for ps in made.values() for p in ps}
    overhead = (pieces / carry.MANIFEST).stat().st_size
    assert all(overhead + sum(size[f] for f in call) <= 2.5 * carry.MIB for call in calls) and len(calls) == 4
    out = tmp_path / "out"
    written = carry.join(pieces, out)
    assert [w.name for w in written] == ["a.gguf", "b.gguf"]
    assert (out / "a.gguf").read_bytes() == a.read_bytes() and (out / "b.gguf").read_bytes() == b.read_bytes()
    assert carry.join(pieces, out, ["b.gguf"]) == [out / "b.gguf"]  # already there and intact: kept


def test_a_missing_or_damaged_piece_writes_nothing_and_names_it(tmp_path: Path) -> None:
    a = random_file(tmp_path / "a.bin", 3 * carry.MIB, 3)
    pieces = tmp_path / "pieces"
    carry.split([a], pieces, carry.MIB)
    (pieces / "a.bin.part01").unlink()
    with pytest.raises(HarnessError, match=r"a.bin.part01 missing; nothing was written"):
        carry.join(pieces, tmp_path / "out")
    carry.split([a], pieces, carry.MIB)
    damaged = bytearray((pieces / "a.bin.part02").read_bytes())
    damaged[7] ^= 1
    (pieces / "a.bin.part02").write_bytes(bytes(damaged))
    with pytest.raises(HarnessError, match=r"a.bin.part02 is damaged"):
        carry.join(pieces, tmp_path / "out")
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_resplitting_replaces_old_pieces_and_keeps_other_entries(tmp_path: Path) -> None:
    pieces = tmp_path / "pieces"
    a = random_file(tmp_path / "a.bin", 3 * carry.MIB, 4)
    b = random_file(tmp_path / "b.bin", carry.MIB // 2, 5)
    carry.split([a, b], pieces, carry.MIB)
    random_file(a, carry.MIB + 1, 6)
    carry.split([a], pieces, 2 * carry.MIB)
    manifest = json.loads((pieces / carry.MANIFEST).read_text())
    assert sorted(manifest) == ["a.bin", "b.bin"] and len(manifest["a.bin"]["pieces"]) == 1
    assert sorted(p.name for p in pieces.glob("a.bin.part*")) == ["a.bin.part00"]
    carry.join(pieces, tmp_path / "out")
    assert (tmp_path / "out" / "a.bin").read_bytes() == a.read_bytes()


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="no file at"):
        carry.split([tmp_path / "nope"], tmp_path / "pieces", carry.MIB)
    with pytest.raises(HarnessError, match="too small"):
        carry.split([random_file(tmp_path / "x", 10, 7)], tmp_path / "pieces", 1000)
    with pytest.raises(HarnessError, match=r"no manifest\.json"):
        carry.join(tmp_path / "empty", tmp_path / "out")
    carry.split([random_file(tmp_path / "y", 2 * carry.MIB, 8)], tmp_path / "p2", 2 * carry.MIB)
    with pytest.raises(HarnessError, match="over the limit of one call"):
        carry.plan(tmp_path / "p2", carry.MIB)
    with pytest.raises(HarnessError, match="z not in"):
        carry.join(tmp_path / "p2", tmp_path / "out", ["z"])


def test_cli_prints_the_calls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = random_file(tmp_path / "m.gguf", 3 * carry.MIB, 9)
    extra = random_file(tmp_path / "src.tar.gz", carry.MIB // 2, 10)
    pieces = tmp_path / "pieces"
    args = ["carry", "split", str(f), "--pieces", str(pieces), "--max-mib", "1", "--limit-mib", "2", "--tree-mib", "0"]
    assert main([*args, "--first-extra", str(extra)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("call ")]
    first = json.loads(lines[0].split("carry ", 1)[1])
    assert first[0] == str(extra) and first[1].endswith("manifest.json") and len(lines) == 3
    assert main(["carry", "join", "--pieces", str(pieces), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "m.gguf").read_bytes() == f.read_bytes()


def test_plan_counts_the_working_tree_and_gives_large_extras_a_call_of_their_own(tmp_path: Path) -> None:
    pieces = tmp_path / "pieces"
    carry.split([random_file(tmp_path / "m.bin", 2 * carry.MIB, 11)], pieces, carry.MIB)
    assert carry.plan(pieces, int(2.5 * carry.MIB)) == [["m.bin.part00", "m.bin.part01"]]
    # the tree travels with every call: one piece per call then
    assert carry.plan(pieces, int(2.5 * carry.MIB), tree=carry.MIB) == [["m.bin.part00"], ["m.bin.part01"]]
    # other paths that leave no room for a piece go alone in the first call (not over the limit beside a piece)
    calls = carry.plan(pieces, int(2.5 * carry.MIB), first_extra=2 * carry.MIB)
    assert calls == [[], ["m.bin.part00", "m.bin.part01"]]
    # pieces fill the calls largest first: a, b, c of 1, 2 and 1 MiB take two calls of 2 MiB (b; a and c), not three
    packed = tmp_path / "packed"
    for name, mib in (("a", 1), ("b", 2), ("c", 1)):
        carry.split([random_file(tmp_path / name, mib * carry.MIB, 12)], packed, 2 * carry.MIB)
    overhead = (packed / carry.MANIFEST).stat().st_size
    assert carry.plan(packed, 2 * carry.MIB + overhead) == [["b.part00"], ["a.part00", "c.part00"]]
    with pytest.raises(HarnessError, match="working tree"):
        carry.plan(pieces, int(2.5 * carry.MIB), tree=2 * carry.MIB)
    with pytest.raises(HarnessError, match="first call's other paths"):
        carry.plan(pieces, int(2.5 * carry.MIB), first_extra=3 * carry.MIB)
