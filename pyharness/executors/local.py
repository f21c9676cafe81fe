"""`pyharness matrix --executor local` (the default): every cell in this process, one after another.

This is `pyharness.matrix.run_matrix`; it imports nothing of Ray. On a host with several GPUs its GPU cells run on
one GPU (the first visible one), as a Ray task with `num_gpus=1` does: llama.cpp otherwise splits a model over every
GPU it sees (pipeline-parallel prefill), and the two executors would measure different things.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pyharness.errors import HarnessError
from pyharness.matrix import Builder, MatrixResult, MatrixSpec, run_matrix
from pyharness.store import Store


def check_gpu_kind(spec: MatrixSpec, gpu_name: str) -> None:
    """A matrix pinned to a GPU kind runs its cuda cells only on that kind of GPU."""
    if not spec.gpu_kind or "cuda" not in spec.backends:
        return
    if spec.gpu_kind.lower() not in gpu_name.lower():
        raise HarnessError(
            f"{spec.path}: the matrix pins gpu_kind = {spec.gpu_kind!r}, but this machine's GPU is "
            f"{gpu_name or 'none'}; nothing was run",
            "run it where that GPU is, or through a cluster that has it (--executor ray --address ...)",
        )


@contextmanager
def one_gpu_per_cell(spec: MatrixSpec, gpu_count: int) -> Iterator[str | None]:
    """Make only the first visible GPU visible to the matrix's tools while it runs (CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        listed = [str(i) for i in range(gpu_count)]
    else:
        listed = [d.strip() for d in visible.split(",") if d.strip()]
    if "cuda" not in spec.backends or len(listed) <= 1:
        yield visible
        return
    first = listed[0]
    os.environ["CUDA_VISIBLE_DEVICES"] = first
    print(
        f"matrix {spec.name}: GPU cells run on GPU {first} alone (CUDA_VISIBLE_DEVICES={first}), one GPU per cell as "
        "with --executor ray",
        file=sys.stderr,
    )
    try:
        yield first
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible


@dataclass
class LocalExecutor:
    name: str = "local"

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
    ) -> MatrixResult:
        gpu_count = 0
        if not dry_run:
            from pyharness.host import host_info

            host = host_info()
            check_gpu_kind(spec, host.gpu_name)
            gpu_count = host.gpu_count
        with one_gpu_per_cell(spec, gpu_count):
            return run_matrix(
                spec,
                store,
                builder=builder,
                text=text,
                root=root,
                retry_failed=retry_failed,
                dry_run=dry_run,
                echo=echo,
                progress=progress,
            )
