"""llama-cpp-python 0.3.36 drives our builds' libllama in-process (LLAMA_CPP_LIB_PATH)."""

from __future__ import annotations

import pytest

from pyharness.bindings import INSTALLED, library_dir, smoke_test


@pytest.mark.parametrize("variant", ["patched", INSTALLED])
def test_prompt_is_tokenized_and_evaluated_by_our_library(variant: str) -> None:
    result = smoke_test(variant, "smollm2-135m", prompt="The capital of France is")
    assert result["llama_cpp_python"] == "0.3.36"
    assert result["library"].startswith(str(library_dir(variant).resolve()))
    assert result["n_tokens"] >= 5
    assert result["logits_finite"]
    assert result["top_piece"].strip() != ""
