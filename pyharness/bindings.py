"""Drive a build's libllama in-process through llama-cpp-python 0.3.36 (installed without its own llama.cpp).

llama-cpp-python loads the library named by LLAMA_CPP_LIB_PATH when it is first imported, and a process can hold
one libllama only, so each use runs in a fresh Python process that reports back as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pyharness.errors import HarnessError

INSTALLED = "installed"

_PROBE = r"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama

model, prompt = sys.argv[1], sys.argv[2]
llm = Llama(model_path=model, n_ctx=256, n_batch=64, n_threads=2, verbose=False)
tokens = llm.tokenize(prompt.encode(), add_bos=True)
llm.eval(tokens)
# The last token's logits straight from libllama (the high-level Llama keeps them only with logits_all).
logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
top = int(np.argmax(logits))
maps = open("/proc/self/maps").read().split()
lib = sorted({m for m in maps if "/libllama.so" in m})
print(json.dumps({
    "library": lib[0] if lib else "",
    "llama_cpp_python": llama_cpp.__version__,
    "n_tokens": len(tokens),
    "tokens": tokens,
    "logits_finite": bool(np.isfinite(logits).all()),
    "top_token": top,
    "top_piece": llm.detokenize([top]).decode(errors="replace"),
}))
"""


def library_dir(variant: str) -> Path:
    """The folder holding libllama.so: a build's bin/ or, for 'installed', the one `pip install .` put here."""
    if variant == INSTALLED:
        from importlib import metadata

        try:
            folder = Path(str(metadata.distribution("pyharness").locate_file("pyharness/lib")))
        except metadata.PackageNotFoundError:
            folder = Path(__file__).resolve().parent / "lib"
        if not (folder / "libllama.so").is_file():
            raise HarnessError(f"no libllama.so in {folder}", "install the project with `pip install .`")
        return folder
    from pyharness.build import load_build

    info = load_build(variant, "cpu")
    folder = info.bin_dir
    if not (folder / "libllama.so").is_file():
        raise HarnessError(f"no libllama.so in {folder}", f"rebuild: pyharness build --variant {variant}")
    return folder


def smoke_test(variant: str, model: str, *, prompt: str = "The capital of France is") -> dict[str, Any]:
    """Tokenize and evaluate `prompt` with the variant's libllama; returns what the probe saw."""
    from pyharness.models import get_model

    folder = library_dir(variant)
    model_path = get_model(model)
    try:
        import llama_cpp  # noqa: F401  (only checks that it is installed; the probe imports it afresh)
    except ImportError as exc:
        raise HarnessError(
            "llama-cpp-python is not installed",
            'CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install llama-cpp-python==0.3.36',
        ) from exc
    except (OSError, RuntimeError):
        pass  # installed, but found no library of its own: expected without LLAMA_CPP_LIB_PATH
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(folder)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(model_path), prompt], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise HarnessError(f"llama-cpp-python could not evaluate the prompt: {last}", f"library folder: {folder}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result["library"]).resolve().parent != folder.resolve():
        raise HarnessError(
            f"llama-cpp-python loaded {result['library']}, not the build in {folder}",
            "check LLAMA_CPP_LIB_PATH handling of llama-cpp-python",
        )
    return result
