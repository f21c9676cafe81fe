"""Where things live: the project checkout, the vendored tree, build and cache folders."""

from __future__ import annotations

import os
from pathlib import Path

from pyharness.errors import HarnessError

PIN_FILE = Path("vendor") / "pin.toml"


def project_root() -> Path:
    """The checkout holding vendor/pin.toml: $PYHARNESS_ROOT, else the nearest parent of the cwd."""
    env = os.environ.get("PYHARNESS_ROOT")
    if env:
        root = Path(env).resolve()
        if not (root / PIN_FILE).is_file():
            raise HarnessError(f"PYHARNESS_ROOT={env} holds no {PIN_FILE}", "point it at a pyharness checkout")
        return root
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / PIN_FILE).is_file():
            return candidate
    source_checkout = Path(__file__).resolve().parent.parent
    if (source_checkout / PIN_FILE).is_file():
        return source_checkout
    raise HarnessError(
        f"no {PIN_FILE} in {here} or its parents",
        "run pyharness inside the project checkout or set PYHARNESS_ROOT",
    )


def vendor_dir(root: Path | None = None) -> Path:
    return (root or project_root()) / "vendor" / "llama.cpp"


def trees_dir(root: Path | None = None) -> Path:
    """Detached worktrees of the vendored repo, one per variant, that builds compile from."""
    return (root or project_root()) / "vendor" / "trees"


def patches_dir(root: Path | None = None) -> Path:
    return (root or project_root()) / "patches"


def build_root(root: Path | None = None) -> Path:
    return (root or project_root()) / "build"


def cache_dir() -> Path:
    """Downloads and models: $PYHARNESS_CACHE, else ~/.cache/pyharness."""
    env = os.environ.get("PYHARNESS_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "pyharness"
    path.mkdir(parents=True, exist_ok=True)
    return path
