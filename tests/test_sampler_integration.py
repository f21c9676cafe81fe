"""`--sampler-kernel sortfree` in llama.cpp's tools: documented in the help, bad values refused, incompatible
chains fall back with a warning, and the CPU path and backend sampling (`-bs`) pick the same tokens."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pyharness.models import get_model
from tests.conftest import ROOT

BIN = ROOT / "build" / "patched-cpu" / "bin"
COMPLETION = BIN / "llama-completion"


def completion(*args: str) -> subprocess.CompletedProcess[str]:
    assert COMPLETION.is_file(), "build the patched variant first: pyharness build --variant patched --backend cpu"
    return subprocess.run([str(COMPLETION), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model() -> Path:
    return Path(get_model("smollm2-135m"))


def generate(model: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return completion(
        "-m",
        str(model),
        "-p",
        "The capital of France is",
        "-n",
        "48",
        "-t",
        "2",
        "-c",
        "256",
        "--seed",
        "42",
        "--temp",
        "0.8",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--min-p",
        "0.05",
        "-no-cnv",
        "--no-warmup",
        "--ignore-eos",
        *extra,
    )


def test_help_documents_the_option() -> None:
    res = completion("--help")
    assert res.returncode == 0
    assert "--sampler-kernel {default,sortfree}" in res.stdout
    assert "no sort of the vocabulary" in res.stdout


def test_bad_value_is_refused(model: Path) -> None:
    res = generate(model, "--sampler-kernel", "sorted")
    assert res.returncode != 0
    assert "invalid value for --sampler-kernel: sorted" in res.stderr


@pytest.mark.slow
def test_sortfree_cpu_and_backend_sampling_agree(model: Path) -> None:
    cpu = generate(model, "--sampler-kernel", "sortfree")
    assert cpu.returncode == 0, cpu.stderr[-2000:]
    assert "sortfree" in cpu.stderr  # the sampler chain printed at startup names it
    backend = generate(model, "--sampler-kernel", "sortfree", "-bs")
    assert backend.returncode == 0, backend.stderr[-2000:]
    assert len(cpu.stdout) > len("The capital of France is") + 20
    assert cpu.stdout == backend.stdout
    # another seed gives another text: the comparison above is not between two fixed strings
    other = generate(model, "--sampler-kernel", "sortfree", "--seed", "7")
    assert other.returncode == 0 and other.stdout != cpu.stdout


@pytest.mark.slow
def test_incompatible_chain_falls_back_with_a_warning(model: Path) -> None:
    res = generate(model, "--sampler-kernel", "sortfree", "--typical", "0.9")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--sampler-kernel sortfree: sampler 'typ_p' is active" in res.stderr
    assert "using the default sampler chain" in res.stderr
