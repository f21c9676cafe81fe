"""Executors without a cluster: the local default imports no Ray, bad executor options, what a cell asks of a node,
the harness fingerprint, a node's build cache, and a worker refusing to run another harness's cell."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness import matrix
from pyharness.errors import HarnessError
from pyharness.executors import demands, fingerprint, local, node_builds, worker
from tests.conftest import ROOT
from tests.fixtures import executor_fakes

SMALL = """\
[matrix]
name = "small"
variants = ["upstream", "patched"]
backends = ["cpu", "cuda"]
models = ["smollm2-135m"]
gpu_kind = "H100"

[flags]
threads = 2

[[eval]]
kind = "bench"
prompt = [8]
gen = [2]
repetitions = 1

[[eval]]
kind = "sampler"
threads = 3
"""


def write(tmp_path: Path, text: str, name: str = "m.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=evalkit.isolated_env(tmp_path), capture_output=True, text=True
    )


# ------------------------------------------------------------------------------------------------ the local default


@pytest.mark.parametrize("extra", [[], ["--executor", "local"]])
def test_the_local_executor_is_the_default_and_imports_no_ray(tmp_path: Path, extra: list[str]) -> None:
    args = ["matrix", "matrices/default.toml", "--dry-run", "--db", str(tmp_path / "r.sqlite"), *extra]
    code = (
        "import sys\n"
        "from pyharness.cli import main\n"
        f"rc = main({args!r})\n"
        "import pyharness.executors.local, pyharness.executors.worker, pyharness.executors.demands\n"
        "print('ray imported' if 'ray' in sys.modules else 'no ray')\n"
        "sys.exit(rc)\n"
    )
    proc = run_cli(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "no ray"
    assert "matrix default: 8 cells" in proc.stderr and "Ray node" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--address", "auto"], "--address auto is for the Ray executor"),
        (["--executor", "ray", "--retries", "-1"], "--retries -1 is negative"),
    ],
)
def test_bad_executor_options_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pyharness", "matrix", "matrices/default.toml", "--dry-run", *args],
        cwd=ROOT,
        env=evalkit.isolated_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyharness: error: ") and needle in lines[0], proc.stderr


def test_the_ray_executor_without_ray_says_how_to_install_it(tmp_path: Path) -> None:
    args = ["matrix", "matrices/default.toml", "--executor", "ray", "--db", str(tmp_path / "r.sqlite")]
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # as if it were not installed\n"
        "from pyharness.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    proc = run_cli(code, tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the ray package" in lines[0] and "pip install 'pyharness[cluster]'" in lines[0]


# ------------------------------------------------------------------------------------------------ demands


def test_what_each_cell_asks_of_a_node(tmp_path: Path) -> None:
    spec = matrix.load_matrix(write(tmp_path, SMALL))
    asked = {c.label(): demands.cell_demand(c, spec.gpu_kind).as_resources() for c in spec.cells()}
    assert asked["upstream-cpu smollm2-135m kv=f16 fa=auto bench(p8 n2 d0 r1)"] == {"CPU": 2.0}
    assert asked["patched-cuda smollm2-135m kv=f16 fa=auto bench(p8 n2 d0 r1)"] == {"CPU": 1.0, "GPU": 1.0, "H100": 1.0}
    sampler = [v for k, v in asked.items() if "cpu" in k and "sampler" in k]
    assert sampler and all(v == {"CPU": 3.0} for v in sampler)


def test_a_resource_no_node_has_names_the_cells(tmp_path: Path) -> None:
    spec = matrix.load_matrix(write(tmp_path, SMALL))
    cells = spec.cells()
    asked = [demands.cell_demand(c, spec.gpu_kind) for c in cells]
    cpu_only = demands.NodeResources("host/abc123", {"CPU": 8.0, "memory": 1e9, "node:10.0.0.1": 1.0})
    with pytest.raises(HarnessError) as info:
        demands.check_feasible(cells, asked, [cpu_only])
    problem = info.value.problem
    assert "4 cell(s) need {CPU: 1, GPU: 1, H100: 1}" in problem
    assert "patched-cuda smollm2-135m kv=f16 fa=auto bench(p8 n2 d0 r1)" in problem
    assert "host/abc123 {CPU: 8}" in problem and "nothing was run" in problem and "memory" not in problem
    h100 = demands.NodeResources("gpu/def456", {"CPU": 4.0, "GPU": 8.0, "H100": 8.0})
    demands.check_feasible(cells, asked, [cpu_only, h100])  # every cell fits somewhere
    with pytest.raises(HarnessError, match=r"need \{CPU: 3\}"):
        demands.check_feasible(cells, asked, [demands.NodeResources("small/1", {"CPU": 2.0, "GPU": 1, "H100": 1})])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('gpu_kind = "H100"', 'gpu_kind = "H100 SXM"'), "gpu_kind must be a GPU kind"),
        (('backends = ["cpu", "cuda"]', 'backends = ["cpu"]'), "no backend is cuda"),
    ],
)
def test_gpu_kind_is_checked_with_its_line(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    text = SMALL.replace(*edit)
    path = write(tmp_path, text)
    with pytest.raises(HarnessError) as info:
        matrix.load_matrix(path)
    line = next(n for n, ln in enumerate(text.splitlines(), 1) if ln.startswith("gpu_kind"))
    assert f"{path}:{line}:" in info.value.problem and message in info.value.problem


def test_the_gpu_demonstration_matrix_is_one_gpu_per_cell() -> None:
    spec = matrix.load_matrix(ROOT / "matrices" / "ray-gpu-demo.toml")
    cells = spec.cells()
    assert len(cells) == 4 and len({c.label() for c in cells}) == 4  # for a 4-GPU host: N cells on N GPUs
    assert all(demands.cell_demand(c, spec.gpu_kind).as_resources() == {"CPU": 1.0, "GPU": 1.0} for c in cells)


@pytest.mark.parametrize(
    ("visible", "gpus", "during"),
    [
        (None, 4, "0"),  # several GPUs: the first alone, as Ray gives a cell one GPU
        ("2,3", 4, "2"),
        ("3", 4, "3"),  # already one: left alone
        (None, 1, None),  # one GPU: nothing to do
        (None, 0, None),
    ],
)
def test_the_local_executor_gives_gpu_cells_one_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, visible: str | None, gpus: int, during: str | None
) -> None:
    spec = matrix.load_matrix(ROOT / "matrices" / "ray-gpu-demo.toml")
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with local.one_gpu_per_cell(spec, gpus):
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == during
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == visible  # restored
    cpu_only = matrix.load_matrix(
        write(
            tmp_path,
            SMALL.replace('backends = ["cpu", "cuda"]', 'backends = ["cpu"]').replace('gpu_kind = "H100"\n', ""),
        )
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with local.one_gpu_per_cell(cpu_only, 4):
        assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_the_local_executor_runs_a_pinned_gpu_kind_only_on_that_gpu(tmp_path: Path) -> None:
    spec = matrix.load_matrix(write(tmp_path, SMALL))
    with pytest.raises(HarnessError, match="pins gpu_kind = 'H100', but this machine's GPU is none"):
        local.check_gpu_kind(spec, "")
    with pytest.raises(HarnessError, match="NVIDIA H200"):
        local.check_gpu_kind(spec, "NVIDIA H200")
    local.check_gpu_kind(spec, "NVIDIA H100 80GB HBM3")


# ------------------------------------------------------------------------------------------------ fingerprint


def test_the_fingerprint_follows_the_sources(tmp_path: Path) -> None:
    copy = tmp_path / "pyharness"
    shutil.copytree(fingerprint.package_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    same = fingerprint.sources_hash(copy)
    assert same == fingerprint.sources_hash(fingerprint.package_dir())
    assert fingerprint.harness_fingerprint().endswith("+" + same[:12])
    (copy / "executors" / "worker.py").write_text((copy / "executors" / "worker.py").read_text() + "\n# edited\n")
    assert fingerprint.sources_hash(copy) != same


# ------------------------------------------------------------------------------------------------ a node's builds


@pytest.fixture
def node_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYHARNESS_TEST_DIR", str(tmp_path))
    monkeypatch.setenv("PYHARNESS_TESTNODE", "n1")
    return executor_fakes.make_root(tmp_path / "node")


def builds_started(tmp_path: Path) -> list[str]:
    log = tmp_path / "builds.log"
    return [ln.rsplit(" ", 2)[0] for ln in log.read_text().splitlines() if " start " in ln] if log.exists() else []


def test_a_node_builds_each_variant_once_and_again_when_its_key_changes(tmp_path: Path, node_root: Path) -> None:
    want = node_builds.want_for("patched", "cpu", ROOT)
    assert want.series_hash != "none" and want.upstream_commit and "-DGGML_CUDA=ON" not in want.flags
    got: list[object] = []

    def one() -> None:
        got.append(node_builds.ensure_build(want, node="n1", root=node_root, builder=executor_fakes.fake_build))

    threads = [threading.Thread(target=one) for _ in range(3)]  # three cells starting together on one node
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and builds_started(tmp_path) == ["n1 patched-cpu"]
    assert node_builds.ensure_build(want, node="n1", root=node_root, no_build=True).series_hash == want.series_hash
    other = node_builds.BuildWant(**{**want.__dict__, "series_hash": "0" * 64})
    with pytest.raises(node_builds.NodeBuildError, match=r"no patched-cpu build matching .*series"):
        node_builds.ensure_build(other, node="n1", root=node_root, no_build=True)
    node_builds.ensure_build(other, node="n1", root=node_root, builder=executor_fakes.fake_build)
    assert builds_started(tmp_path) == ["n1 patched-cpu", "n1 patched-cpu"]


def test_a_node_without_build_tools_fails_with_its_name_and_log(
    tmp_path: Path, node_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    want = node_builds.want_for("upstream", "cpu", ROOT)
    with pytest.raises(node_builds.NodeBuildError) as info:
        node_builds.ensure_build(want, node="gpu-7/abc123", root=node_root)
    assert "node gpu-7/abc123 cannot build upstream-cpu: cmake, ninja, git" in info.value.problem
    assert f"PATH={empty}" in info.value.log and "missing: cmake" in info.value.log
    assert builds_started(tmp_path) == []


def test_a_worker_refuses_another_harness_before_doing_anything(tmp_path: Path, node_root: Path) -> None:
    spec = matrix.load_matrix(write(tmp_path, SMALL))
    cell = spec.cells()[0]
    settings = worker.JobSettings(
        spec=spec,
        text=None,
        echo=False,
        no_build=False,
        fingerprint="0.0.1+000000000000",
        wants={k: node_builds.want_for(*k, root=ROOT) for k in worker.needed_builds(cell)},
        node_builder=executor_fakes.fake_build,
    )
    outcome = worker.run_job(0, cell, settings, worker.NodeIdentity("abcdef0123", "gpu-7"))
    fields = outcome.record.fields
    assert fields["status"] == "failed" and fields["config_hash"].startswith("mismatch-")
    assert "harness version mismatch: node gpu-7/abcdef runs pyharness" in fields["error"]
    assert "the driver 0.0.1+000000000000" in fields["error"]
    assert builds_started(tmp_path) == []
