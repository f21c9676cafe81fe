"""`pyharness matrix --executor local` (the default): every cell in this process, one after another.

This is `pyharness.matrix.run_matrix` as it always was; it imports nothing of Ray.
"""

from __future__ import annotations

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
        if not dry_run:
            from pyharness.host import host_info

            check_gpu_kind(spec, host_info().gpu_name)
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
