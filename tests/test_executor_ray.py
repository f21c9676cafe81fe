"""The Ray executor on real multi-node Ray clusters on this machine (`ray.cluster_utils.Cluster`, fake GPUs and GPU
kinds as custom resources). The cells and builds are fakes (tests/fixtures/executor_fakes.py) that build nothing and
run no llama.cpp tool, but everything else is real: placement, the per-node build cache, the driver's store,
retries, cancellation and resume. test_executor_parity.py runs real cells."""

from __future__ import annotations

import _thread
import itertools
import json
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness import matrix
from pyharness.errors import HarnessError
from pyharness.executors import ray_executor
from pyharness.executors.ray_executor import RayExecutor
from pyharness.store import Store
from tests.fixtures import executor_fakes

FAKE = """\
[matrix]
name = "{name}"
variants = {variants}
backends = {backends}
models = ["{model}"]
{pin}

[flags]
extra = {extra}

[[eval]]
kind = "bench"
prompt = [8]
gen = [0]
repetitions = 1
"""


def fake_matrix(
    tmp_path: Path,
    name: str,
    extras: list[list[str]],
    *,
    variants: tuple[str, ...] = ("upstream",),
    backends: tuple[str, ...] = ("cpu",),
    gpu_kind: str = "",
) -> matrix.MatrixSpec:
    text = FAKE.format(
        name=name,
        variants=json.dumps(list(variants)),
        backends=json.dumps(list(backends)),
        model=evalkit.real_model(),
        pin=f'gpu_kind = "{gpu_kind}"' if gpu_kind else "",
        extra=json.dumps(extras),
    )
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return matrix.load_matrix(path)


def node_env(base: Path, name: str) -> dict[str, str]:
    root = executor_fakes.make_root(base / "nodes" / name)
    return {
        "PYHARNESS_TESTNODE": name,
        "PYHARNESS_ROOT": str(root),
        "PYHARNESS_CACHE": str(base / "cache"),
        "PYHARNESS_TEST_DIR": str(base),
    }


def executor(cluster: Cluster, **kwargs: Any) -> RayExecutor:
    return RayExecutor(
        address=cluster.address,
        cell_runner=executor_fakes.fake_cell,
        node_builder=executor_fakes.fake_build,
        poll_s=0.2,
        **kwargs,
    )


def ran(store: Store) -> list[dict[str, Any]]:
    """Every stored run with where and when its fake cell ran."""
    out = []
    for row in store.runs(status=None):
        info = json.loads(row["stdout"]) if row["status"] == "ok" else {}
        out.append({**row, **{f"fake_{k}": v for k, v in info.items()}})
    return out


def builds(base: Path) -> Counter[str]:
    log = base / "builds.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return Counter(ln.rsplit(" ", 2)[0] for ln in lines if " start " in ln)


def markers(base: Path, suffix: str) -> int:
    return len(list((base / "cells").glob(f"*.{suffix}"))) if (base / "cells").exists() else 0


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray")


@pytest.fixture(scope="module")
def cluster(base: Path) -> Iterator[Cluster]:
    """A head without CPUs (the driver's node), a CPU node with 2 CPUs, and a node with 2 CPUs and one GPU, an
    'H100'."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": node_env(base, "head")})
    c.add_node(num_cpus=2, env_vars=node_env(base, "cpu"))
    c.add_node(num_cpus=2, num_gpus=1, resources={"H100": 1}, env_vars=node_env(base, "h100"))
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture
def fresh(base: Path) -> Iterator[Path]:
    """The test's own trace folder (cells and builds are traced under the shared base): cleared before."""
    for folder in ("cells",):
        for path in (base / folder).glob("*") if (base / folder).exists() else []:
            path.unlink()
    yield base


def test_cells_are_placed_by_resource_and_each_node_builds_each_variant_once(
    cluster: Cluster, fresh: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extras = [["--sleep=0.4", f"--cell={i}"] for i in range(3)]
    spec = fake_matrix(
        tmp_path, "placed", extras, variants=("upstream", "patched"), backends=("cpu", "cuda"), gpu_kind="H100"
    )
    before = builds(fresh)
    with Store(tmp_path / "r.sqlite") as store:
        result = executor(cluster).run(spec, store, progress=True)
        assert (result.ran, result.ok, result.failed, result.skipped) == (12, 12, [], 0)
        runs = ran(store)
    assert len({r["cell"] for r in runs}) == 12
    gpu = sorted((r for r in runs if r["backend"] == "cuda"), key=lambda r: r["fake_start"])
    assert len(gpu) == 6 and {r["fake_node"] for r in gpu} == {"h100"}  # only the node with an H100
    for first, second in itertools.pairwise(gpu):
        assert first["fake_end"] <= second["fake_start"], "two GPU cells shared the node's one GPU"
    assert {r["fake_node"] for r in runs if r["backend"] == "cpu"} <= {"cpu", "h100"}
    new = builds(fresh) - before
    ran_where = {(r["fake_node"], f"{r['variant']}-{r['backend']}") for r in runs}
    assert new == Counter({f"{node} {build}": 1 for node, build in ran_where}), new  # once per node and variant
    err = capsys.readouterr().err
    assert "running: " in err and "12 to run on 3 Ray node(s)" in err and "ran on " in err

    with Store(tmp_path / "r.sqlite") as store:  # all stored: nothing runs, nothing builds
        again = executor(cluster).run(spec, store, progress=False)
        assert (again.ran, again.skipped) == (0, 12) and store.count("runs") == 12
    assert builds(fresh) - before == new


def test_gpu_cells_run_one_at_a_time_on_each_gpu(cluster: Cluster, fresh: Path, tmp_path: Path) -> None:
    """Without a pinned GPU kind, the GPU is what a cuda cell asks for: only the GPU node runs them, one at a time
    although it has two CPUs."""
    spec = fake_matrix(tmp_path, "gpus", [["--sleep=0.4", f"--cell={i}"] for i in range(4)], backends=("cuda",))
    with Store(tmp_path / "r.sqlite") as store:
        result = executor(cluster).run(spec, store, progress=False)
        assert (result.ran, result.ok) == (4, 4)
        runs = sorted(ran(store), key=lambda r: r["fake_start"])
    assert {r["fake_node"] for r in runs} == {"h100"}
    for first, second in itertools.pairwise(runs):
        assert first["fake_end"] <= second["fake_start"], "two GPU cells shared the node's one GPU"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"backends": ("cpu", "cuda"), "gpu_kind": "H200"}, "need {CPU: 1, GPU: 1, H200: 1}"),
        ({"extra_flags": "threads = 4"}, "need {CPU: 4}"),
    ],
)
def test_a_resource_no_node_has_stops_the_matrix_before_anything_runs(
    cluster: Cluster, fresh: Path, tmp_path: Path, kwargs: dict[str, Any], needle: str
) -> None:
    flags = kwargs.pop("extra_flags", "")
    spec = fake_matrix(tmp_path, "nowhere", [["--x"]], **kwargs)
    if flags:
        path = spec.path
        path.write_text(path.read_text().replace("[flags]\n", f"[flags]\n{flags}\n"))
        spec = matrix.load_matrix(path)
    before = builds(fresh)
    with Store(tmp_path / "r.sqlite") as store:
        with pytest.raises(HarnessError) as info:
            executor(cluster).run(spec, store, progress=False)
        assert store.count("runs") == 0
    problem = info.value.problem
    assert needle in problem and "nothing was run" in problem
    assert spec.cells()[-1].label() in problem  # the cells are named
    assert "{CPU: 2}" in problem  # and what the nodes have
    assert markers(fresh, "started") == 0 and builds(fresh) == before


def test_a_node_running_another_harness_is_refused(
    cluster: Cluster, fresh: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = fake_matrix(tmp_path, "versions", [["--x"]])
    monkeypatch.setattr(ray_executor, "harness_fingerprint", lambda: "0.0.1+000000000000")  # the driver differs
    before = builds(fresh)
    with Store(tmp_path / "r.sqlite") as store:
        with pytest.raises(HarnessError) as info:
            executor(cluster).run(spec, store, progress=False)
        assert store.count("runs") == 0
    assert "harness version mismatch: node " in info.value.problem
    assert "the driver 0.0.1+000000000000" in info.value.problem and "nothing was run" in info.value.problem
    assert "ray start" in info.value.fix
    assert markers(fresh, "started") == 0 and builds(fresh) == before


def test_ctrl_c_cancels_outstanding_cells_and_a_rerun_resumes(cluster: Cluster, fresh: Path, tmp_path: Path) -> None:
    # staggered, so that when the second cell finishes others are half-way (4 slots: cells 4 and 5 run from then on
    # until 2.8 s and 3.6 s, cells 6 and 7 wait)
    extras = [[f"--sleep={0.6 + 0.4 * i:.1f}", f"--cell={i}"] for i in range(8)]
    spec = fake_matrix(tmp_path, "interrupted", extras)
    db = tmp_path / "r.sqlite"

    def stored_rows() -> int:
        if not db.exists():
            return 0
        with sqlite3.connect(db, timeout=60) as conn:  # the store commits each run's rows on their own
            try:
                return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
            except sqlite3.OperationalError:  # the table is not there yet
                return 0

    def interrupt_after_two() -> None:
        # two cells done, one of them already stored by the driver (a cell's marker is written before its result
        # reaches the driver), and another one running (on a loaded machine Ray may start the next cells late)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            markers(fresh, "finished") < 2
            or stored_rows() < 1
            or markers(fresh, "started") <= markers(fresh, "finished")
        ):
            time.sleep(0.05)
        _thread.interrupt_main()  # Ctrl-C

    # Connected beforehand, so the executor keeps the connection: its own cancelling must stop the cells (a driver
    # that disconnects takes its job's tasks down with it anyway)
    ray.init(address=cluster.address, log_to_driver=False)
    # interrupt_main() runs the SIGINT handler in place: Python's own, which raises KeyboardInterrupt, whatever an
    # earlier test or library left there (the whole suite failed here with "DID NOT RAISE" where this file alone passed)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_after_two, daemon=True).start()
        with Store(db) as store, pytest.raises(KeyboardInterrupt):
            executor(cluster).run(spec, store, progress=False)
        time.sleep(3.5)  # longer than the cells had left: a cell still running now was not stopped
        started, finished = markers(fresh, "started"), markers(fresh, "finished")
    finally:
        ray.shutdown()
        signal.signal(signal.SIGINT, handler)
    assert started < 8, "cells queued at Ctrl-C started anyway"
    assert finished < started, "the cells running at Ctrl-C were not stopped"
    with Store(db) as store:
        stored = store.count("runs")
        assert 1 <= stored <= finished and stored == len(store.runs(status="ok"))  # whole rows only

        resumed = executor(cluster).run(spec, store, progress=False)
        assert (resumed.skipped, resumed.ran, resumed.ok) == (stored, 8 - stored, 8 - stored)
        runs = ran(store)
        assert len(runs) == 8 and len({r["cell"] for r in runs}) == 8 and len({r["config_hash"] for r in runs}) == 8

        again = executor(cluster).run(spec, store, progress=False)
        assert (again.ran, again.skipped) == (0, 8)


def test_a_killed_worker_is_retried_then_stored_as_failed_with_its_log(
    cluster: Cluster, fresh: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = fake_matrix(tmp_path, "killed", [["--sleep=0.2", "--a"], ["--die"], ["--sleep=0.2", "--b"]])
    with Store(tmp_path / "r.sqlite") as store:
        result = executor(cluster, retries=1).run(spec, store, progress=False)
        assert (result.ran, result.ok, len(result.failed)) == (3, 2, 1)
        failed = store.runs(status="failed")
    assert len(failed) == 1 and "--die" in failed[0]["cell"]
    assert failed[0]["error"].startswith("lost 2 times") and "--retries 1" in failed[0]["error"]
    log = failed[0]["stderr"]
    assert "attempt 1 on node " in log and "attempt 2 on node " in log and "WorkerCrashedError" in log
    assert failed[0]["config_hash"].startswith("lost-") and failed[0]["host_name"]
    assert markers(fresh, "started") == 2 + 2  # two good cells, and the bad one twice
    assert "retry 1 of 1" in capsys.readouterr().err


def test_a_node_removed_mid_matrix_loses_nothing_and_writes_nothing_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": node_env(tmp_path, "head")})
    c.add_node(num_cpus=2, env_vars=node_env(tmp_path, "a"))
    doomed = c.add_node(num_cpus=2, env_vars=node_env(tmp_path, "b"))
    c.wait_for_nodes()
    try:
        spec = fake_matrix(tmp_path, "removed", [["--sleep=1.5", f"--cell={i}"] for i in range(6)])

        def remove_b_once_it_runs_a_cell() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(p.read_text() == "b" for p in (tmp_path / "cells").glob("*.started")):
                    c.remove_node(doomed)
                    return
                time.sleep(0.05)

        remover = threading.Thread(target=remove_b_once_it_runs_a_cell, daemon=True)
        remover.start()
        with Store(tmp_path / "r.sqlite") as store:
            result = executor(c).run(spec, store, progress=False)
            remover.join()
            assert (result.ran, result.ok, result.failed) == (6, 6, [])
            runs = ran(store)
        assert len(runs) == 6 and len({r["cell"] for r in runs}) == 6 and len({r["config_hash"] for r in runs}) == 6
        assert {r["fake_node"] for r in runs} == {"a"}  # b's cells died with it and ran again on a
        started_on_b = [p for p in (tmp_path / "cells").glob("*.started") if p.read_text() == "b"]
        assert started_on_b and "NodeDiedError" in capsys.readouterr().err
    finally:
        c.shutdown()


def test_a_node_without_build_tools_fails_its_cells_with_its_name_and_log(tmp_path: Path) -> None:
    (tmp_path / "empty-bin").mkdir()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": node_env(tmp_path, "head")})
    c.add_node(num_cpus=1, env_vars={**node_env(tmp_path, "bare"), "PATH": str(tmp_path / "empty-bin")})
    c.wait_for_nodes()
    try:
        spec = fake_matrix(tmp_path, "bare", [["--x"]])
        ex = RayExecutor(address=c.address, cell_runner=executor_fakes.fake_cell, poll_s=0.2)  # the real builder
        with Store(tmp_path / "r.sqlite") as store:
            result = ex.run(spec, store, progress=False)
            assert (result.ran, result.ok) == (1, 0)
            row = store.runs(status="failed")[0]
    finally:
        c.shutdown()
    node = ex.surveys[-1].node.label() if ex.surveys[-1].node.hostname else ""
    assert "build failed: node " in row["error"] and "cannot build upstream-cpu: cmake, ninja, git" in row["error"]
    bare = [s for s in ex.surveys if s.missing_tools]
    assert len(bare) == 1 and bare[0].node.label() in row["error"] and node
    assert f"PATH={tmp_path / 'empty-bin'}" in row["stderr"] and "missing: cmake" in row["stderr"]
    assert row["config_hash"].startswith("unbuilt-") and markers(tmp_path, "started") == 0


def test_an_unreachable_address_is_one_clear_error(tmp_path: Path) -> None:
    spec = fake_matrix(tmp_path, "unreachable", [["--x"]])
    t0 = time.monotonic()
    with Store(tmp_path / "r.sqlite") as store:
        with pytest.raises(HarnessError) as info:
            RayExecutor(address="127.0.0.1:1").run(spec, store, progress=False)
        assert store.count("runs") == 0
    assert time.monotonic() - t0 < 30
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in info.value.problem and "ray start --head" in info.value.fix
    assert not ray.is_initialized()
    with sqlite3.connect(tmp_path / "r.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


def test_a_local_instance_offers_the_pinned_gpu_kind_of_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyharness.host

    spec = fake_matrix(tmp_path, "pinned", [["--x"]], backends=("cuda",), gpu_kind="H200")
    h200 = evalkit.fake_host(gpu="NVIDIA H200")
    monkeypatch.setattr(pyharness.host, "host_info", lambda: h200)
    assert RayExecutor()._local_resources(spec) == {"H200": 1.0}  # one per GPU of that kind
    assert RayExecutor(address="auto")._local_resources(spec) == {}  # a cluster declares its own
    monkeypatch.setattr(pyharness.host, "host_info", lambda: evalkit.fake_host(gpu="NVIDIA H100 80GB HBM3"))
    assert RayExecutor()._local_resources(spec) == {}
