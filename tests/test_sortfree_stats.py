"""The sorting-free sampler samples the exact filtered distribution: chi-square tests of 200,000 draws per
configuration, through the GGML op (CPU backend) and through the patched llama.cpp sampler, and a deliberately
wrong sampler that the same test rejects."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pyharness.sortfree_check import ChiSquare, OpDriver, SamplerDriver, SamplerParams, chi_square, reference_probs
from tests.conftest import ROOT

N_SAMPLES = 200_000
# the build and the ggml backend the op runs on: the CPU in CI; on the H100 (scripts/gpu-check sampler-stats)
# PYHARNESS_SAMPLER_LIB=build/patched-cuda/bin PYHARNESS_SAMPLER_BACKEND=CUDA0
LIB_DIR = Path(os.environ.get("PYHARNESS_SAMPLER_LIB", ROOT / "build" / "patched-cpu" / "bin"))
BACKEND = os.environ.get("PYHARNESS_SAMPLER_BACKEND", "CPU")


def logits_for(kind: str, vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "flat":
        return rng.normal(0.0, 0.5, vocab).astype(np.float32)
    if kind == "peaked":
        x = rng.normal(0.0, 1.5, vocab)
        x[rng.choice(vocab, 8, replace=False)] += rng.uniform(3.0, 6.0, 8)
        return x.astype(np.float32)
    if kind == "ties":
        return rng.integers(-6, 4, vocab).astype(np.float32)  # many tokens share each value
    if kind == "masked":
        x = rng.normal(0.0, 2.0, vocab)
        x[rng.random(vocab) < 0.5] = -np.inf
        x[rng.integers(vocab)] = np.nan
        return x.astype(np.float32)
    raise AssertionError(kind)


# (logits kind, vocab, params): vocab sizes, k, p, min-p, temperature, peaked and flat logits, ties, -inf/NaN
CONFIGS = [
    ("peaked", 32000, SamplerParams(0.8, 40, 0.95, 0.05)),  # llama.cpp's defaults
    ("flat", 1000, SamplerParams(1.0, 0, 0.9, 0.0)),
    ("peaked", 1000, SamplerParams(0.8, 40, 0.9, 0.05)),
    ("flat", 32000, SamplerParams(1.5, 100, 1.0, 0.0)),
    ("peaked", 8192, SamplerParams(1.0, 0, 0.5, 0.0)),
    ("peaked", 4096, SamplerParams(2.0, 5, 1.0, 0.0)),
    ("ties", 200, SamplerParams(1.0, 20, 0.8, 0.0)),
    ("flat", 5000, SamplerParams(1.0, 0, 1.0, 0.2)),
    ("flat", 5000, SamplerParams(0.5, 0, 0.3, 0.1)),
    ("flat", 1000, SamplerParams(1.2, 1000, 0.99, 0.0)),
    ("masked", 2000, SamplerParams(0.7, 50, 0.9, 0.02)),
    ("ties", 64, SamplerParams(0.3, 0, 0.6, 0.0)),
    ("peaked", 2048, SamplerParams(1.0, 1, 1.0, 0.0)),
]
# large vocabularies through the op only (the CPU sampler path copies the whole vocabulary per token)
OP_ONLY = [
    ("peaked", 151936, SamplerParams(0.8, 40, 0.9, 0.0)),
    ("peaked", 262144, SamplerParams(0.7, 40, 0.9, 0.05)),
    ("peaked", 49152, SamplerParams(1.0, 0, 0.7, 0.05)),
]


def ids(configs: list[tuple[str, int, SamplerParams]]) -> list[str]:
    return [f"{kind}-{vocab}-{sp.label().replace(' ', ',')}" for kind, vocab, sp in configs]


@pytest.fixture(scope="module")
def op() -> OpDriver:
    return OpDriver(LIB_DIR, BACKEND)


@pytest.fixture(scope="module")
def sampler() -> SamplerDriver:
    return SamplerDriver(LIB_DIR)


def check(samples: np.ndarray, probs: np.ndarray, what: str) -> ChiSquare:
    res = chi_square(samples, probs)
    assert res.outside == 0, f"{what}: {res.outside} samples outside the filtered set"
    assert res.dof >= 1 or probs.max() == 1.0, f"{what}: nothing to test"
    assert res.p_value >= 1e-3, f"{what}: chi2 = {res.statistic:.1f}, dof = {res.dof}, p = {res.p_value:.2e}"
    return res


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "vocab", "sp"), CONFIGS + OP_ONLY, ids=ids(CONFIGS + OP_ONLY))
def test_op_samples_the_filtered_distribution(op: OpDriver, kind: str, vocab: int, sp: SamplerParams) -> None:
    logits = logits_for(kind, vocab, seed=vocab)
    samples = op.draw(logits, sp, N_SAMPLES, seed=vocab + 1)
    assert samples.size == N_SAMPLES
    check(samples, reference_probs(logits, sp), f"op {kind} {vocab} {sp.label()}")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "vocab", "sp"), CONFIGS, ids=ids(CONFIGS))
def test_llama_sampler_samples_the_filtered_distribution(
    sampler: SamplerDriver, kind: str, vocab: int, sp: SamplerParams
) -> None:
    logits = logits_for(kind, vocab, seed=vocab)
    samples = sampler.draw(logits, sp, N_SAMPLES, seed=vocab + 2)
    check(samples, reference_probs(logits, sp), f"sampler {kind} {vocab} {sp.label()}")


def drop_last_nucleus_token(logits: np.ndarray, sp: SamplerParams) -> np.ndarray:
    """A wrong sampler's distribution: the filtered distribution without its least likely kept token."""
    probs = reference_probs(logits, sp)
    kept = np.flatnonzero(probs > 0)
    wrong = probs.copy()
    wrong[kept[np.argmin(probs[kept])]] = 0.0
    return wrong / wrong.sum()


@pytest.mark.parametrize(("kind", "vocab", "sp"), CONFIGS[:3], ids=ids(CONFIGS[:3]))
def test_a_wrong_sampler_is_rejected(kind: str, vocab: int, sp: SamplerParams) -> None:
    logits = logits_for(kind, vocab, seed=vocab)
    wrong = drop_last_nucleus_token(logits, sp)
    samples = np.random.default_rng(7).choice(vocab, N_SAMPLES, p=wrong)
    res = chi_square(samples, reference_probs(logits, sp))
    assert not res.passed and res.p_value < 1e-3
    # and the right one, drawn the same way, is accepted: the test is not simply always failing
    right = np.random.default_rng(7).choice(vocab, N_SAMPLES, p=reference_probs(logits, sp))
    assert chi_square(right, reference_probs(logits, sp)).passed


def test_samples_outside_the_support_fail() -> None:
    probs = np.array([0.5, 0.5, 0.0])
    res = chi_square(np.array([0, 1] * 500 + [2]), probs)
    assert res.outside == 1 and not res.passed


def test_reference_keeps_ties_at_the_cut() -> None:
    logits = np.array([3.0, 1.0, 1.0, 1.0, 0.0], dtype=np.float32)
    # top-k 2: the three tokens tied with the 2nd largest are kept
    p = reference_probs(logits, SamplerParams(1.0, 2, 1.0, 0.0))
    assert (p > 0).tolist() == [True, True, True, True, False]
    # top-p just above the max token's mass: the whole tie group at the cut is kept
    z = np.exp(np.array([3.0, 1.0, 1.0, 1.0, 0.0]) - 3.0).sum()
    p = reference_probs(logits, SamplerParams(1.0, 0, float(1.0 / z) + 1e-3, 0.0))
    assert (p > 0).tolist() == [True, True, True, True, False]


def test_missing_library_says_what_to_do(tmp_path: Path) -> None:
    from pyharness.errors import HarnessError

    with pytest.raises(HarnessError, match="build the patched variant"):
        OpDriver(tmp_path)
