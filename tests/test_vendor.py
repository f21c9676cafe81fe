"""The pin: the vendored tree is the pinned commit, fetching checks the sdist hash, re-running is safe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pyharness import vendor as vendor_mod
from pyharness.errors import HarnessError
from pyharness.vendor import UPSTREAM_BRANCH, check_sdist, load_pin, vendor, vendored_state
from tests.conftest import ROOT, git

PINNED = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


def test_pin_names_the_upstream_commit_and_sdist() -> None:
    pin = load_pin(ROOT)
    assert pin.commit == PINNED
    assert (pin.package, pin.version) == ("llama-cpp-python", "0.3.36")
    assert len(pin.sha256) == 64
    assert "http" not in (ROOT / "vendor" / "pin.toml").read_text()


def test_vendored_tree_is_a_git_repo_at_the_pin(vendored: Path) -> None:
    assert git(vendored, "rev-parse", UPSTREAM_BRANCH) == PINNED
    assert vendored_state(vendored, load_pin(ROOT)) == "ok"
    assert (vendored / "ggml" / "include" / "ggml.h").is_file()


def test_wrong_sdist_hash_is_refused_and_removed(tmp_path: Path) -> None:
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the sdist")
    with pytest.raises(HarnessError, match="sha256") as info:
        check_sdist(fake, load_pin(ROOT))
    assert "removed" in info.value.problem
    assert not fake.exists()


def test_vendor_is_idempotent_and_keeps_local_work(scratch_project: Path) -> None:
    clone = scratch_project / "vendor" / "llama.cpp"
    (clone / "README.md").write_text("local work\n")
    vendor(root=scratch_project)  # already at the pin: nothing happens
    assert (clone / "README.md").read_text() == "local work\n"


def test_vendor_refuses_a_foreign_tree_without_force(scratch_project: Path) -> None:
    clone = scratch_project / "vendor" / "llama.cpp"
    git(clone, "commit", "--quiet", "--allow-empty", "-m", "elsewhere")
    with pytest.raises(HarnessError, match="--force"):
        vendor(root=scratch_project)
    assert git(clone, "log", "-1", "--format=%s") == "elsewhere"


def test_vendor_from_a_local_clone(tmp_path: Path, scratch_project: Path) -> None:
    clone = scratch_project / "vendor" / "llama.cpp"
    source = tmp_path / "other-clone"
    shutil.move(clone, source)
    git(source, "checkout", "--quiet", "--detach", PINNED)
    repo = vendor(from_path=source, root=scratch_project)
    assert git(repo, "rev-parse", "HEAD") == PINNED
    assert git(repo, "rev-parse", UPSTREAM_BRANCH) == PINNED


def test_vendor_from_a_clone_at_another_commit_fails(tmp_path: Path, scratch_project: Path) -> None:
    clone = scratch_project / "vendor" / "llama.cpp"
    git(clone, "commit", "--quiet", "--allow-empty", "-m", "newer")
    source = tmp_path / "moved"
    shutil.move(clone, source)
    with pytest.raises(HarnessError, match="not the pinned"):
        vendor(from_path=source, root=scratch_project)
    assert not clone.exists()


def test_vendor_from_the_sdist_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The full path: the cached sdist (hash-checked) unpacked into a git repo whose HEAD is the pin."""
    root = tmp_path / "fresh"
    (root / "vendor").mkdir(parents=True)
    shutil.copy(ROOT / "vendor" / "pin.toml", root / "vendor" / "pin.toml")
    fetched: list[str] = []
    real_fetch = vendor_mod.fetch_sdist
    monkeypatch.setattr(vendor_mod, "fetch_sdist", lambda pin: fetched.append(pin.file) or real_fetch(pin))
    repo = vendor(root=root)
    assert fetched == ["llama_cpp_python-0.3.36.tar.gz"]
    assert git(repo, "rev-parse", "HEAD") == PINNED
    assert git(repo, "status", "--porcelain") == ""
    assert "includeIf" not in (repo / ".git" / "config").read_text()


def test_pack_and_vendor_from_archive(tmp_path: Path) -> None:
    """Offline machines: the packed pinned tree becomes a vendored repo the series applies to."""
    archive = vendor_mod.pack_upstream(tmp_path / "src.tar.gz", root=ROOT)
    root = tmp_path / "offline"
    (root / "vendor").mkdir(parents=True)
    shutil.copy(ROOT / "vendor" / "pin.toml", root / "vendor" / "pin.toml")
    shutil.copytree(ROOT / "patches", root / "patches")
    repo = vendor(archive=archive, root=root)
    pin = load_pin(root)
    assert vendored_state(repo, pin) == "ok"
    assert (repo / ".git" / "pyharness-synthetic-commit").read_text().strip() == PINNED
    assert not (repo / "models").exists() and (repo / "ggml" / "src" / "ggml-cuda").is_dir()
    from pyharness.patches import apply

    apply(root=root)
    assert git(repo, "status", "--porcelain") == ""


def test_archive_of_another_commit_is_refused(tmp_path: Path) -> None:
    import tarfile

    readme = tmp_path / "README.md"
    readme.write_text("not llama.cpp\n")
    bogus = tmp_path / "bogus.tar.gz"
    with tarfile.open(bogus, "w:gz", format=tarfile.PAX_FORMAT, pax_headers={"comment": "f" * 40}) as tar:
        tar.add(readme, arcname="README.md")
    root = tmp_path / "offline"
    (root / "vendor").mkdir(parents=True)
    shutil.copy(ROOT / "vendor" / "pin.toml", root / "vendor" / "pin.toml")
    with pytest.raises(HarnessError, match="holds commit fffffff, not the pinned"):
        vendor(archive=bogus, root=root)
    assert not (root / "vendor" / "llama.cpp").exists()

    # a truncated archive is refused with a clear error, and leaves nothing behind
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(bogus.read_bytes()[:40])
    with pytest.raises(HarnessError, match="not a readable archive"):
        vendor(archive=truncated, root=root)
    assert not (root / "vendor" / "llama.cpp").exists()
