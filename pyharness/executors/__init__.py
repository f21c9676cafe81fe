"""Executors: where the cells of a matrix run.

`local` (the default) runs them in this process, one after another (`pyharness.executors.local`). `ray` runs each
cell as a Ray task on a local Ray instance or a cluster (`pyharness.executors.ray_executor`), with these parts:

- `demands`: what a cell asks of a node (CPUs for its threads, one GPU, a GPU kind) and the check that some node
  has it;
- `node_builds`: each node's build cache (one build per node per variant, keyed by upstream commit, series hash,
  backend and flags);
- `worker`: what runs on a node (the survey, and one cell); plain Python, no Ray;
- `fingerprint`: the harness's identity, compared between the driver and every node;
- `ray_cluster`, `progress`: joining Ray, and the per-node progress line.

Only `make_executor("ray", ...)` imports Ray; the local path never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pyharness.errors import HarnessError
from pyharness.matrix import Builder, MatrixResult, MatrixSpec
from pyharness.store import Store

EXECUTORS = ("local", "ray")
DEFAULT_RETRIES = 2


class Executor(Protocol):
    name: str

    def run(
        self,
        spec: MatrixSpec,
        store: Store,
        *,
        builder: Builder,
        text: str | None = None,
        root: Path | None = None,
        retry_failed: bool = True,
        dry_run: bool = False,
        echo: bool = False,
        progress: bool = True,
    ) -> MatrixResult: ...


def make_executor(
    name: str = "local", *, address: str | None = None, retries: int = DEFAULT_RETRIES, no_build: bool = False
) -> Executor:
    if name == "local":
        if address:
            raise HarnessError(f"--address {address} is for the Ray executor", "add --executor ray, or drop --address")
        from pyharness.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        try:
            from pyharness.executors.ray_executor import RayExecutor
        except ImportError as exc:
            raise HarnessError(
                f"--executor ray needs the ray package ({exc})",
                "pip install 'pyharness[cluster]' (or pip install ray) on the driver and every node",
            ) from exc
        return RayExecutor(address=address, retries=retries, no_build=no_build)
    raise HarnessError(f"unknown executor '{name}'", f"choose one of: {', '.join(EXECUTORS)}")
