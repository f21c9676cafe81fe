"""ctypes views of the few ggml / llama.cpp structures the sampler checks and benchmarks pass across the C API
(from ggml.h and llama.h of the pinned upstream)."""

from __future__ import annotations

import ctypes
from pathlib import Path

from pyharness.errors import HarnessError

GGML_TYPE_F32 = 0
N_UNIFORMS = 33  # GGML_SAMPLE_SORTFREE_N_UNIFORMS


class InitParams(ctypes.Structure):
    """struct ggml_init_params"""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class Tensor(ctypes.Structure):
    """struct ggml_tensor, the fields up to `data`; callers check it against a real tensor before writing."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
    ]


class TokenData(ctypes.Structure):
    """llama_token_data"""

    _fields_ = [("id", ctypes.c_int32), ("logit", ctypes.c_float), ("p", ctypes.c_float)]


class TokenDataArray(ctypes.Structure):
    """llama_token_data_array"""

    _fields_ = [
        ("data", ctypes.POINTER(TokenData)),
        ("size", ctypes.c_size_t),
        ("selected", ctypes.c_int64),
        ("sorted", ctypes.c_bool),
    ]


def load_library(lib_dir: Path, name: str) -> ctypes.CDLL:
    """lib<name>.so of a build, loaded with its symbols global (the next library resolves against it)."""
    path = lib_dir / f"lib{name}.so"
    if not path.is_file():
        raise HarnessError(
            f"{path} does not exist",
            "build the patched variant first: pyharness build --variant patched --backend cpu",
        )
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def set_backend_threads(lib: ctypes.CDLL, backend: int, n_threads: int) -> None:
    """ggml_backend_set_n_threads through the backend's registry, for backends that have threads (the CPU)."""
    vp = ctypes.c_void_p
    lib.ggml_backend_get_device.restype, lib.ggml_backend_get_device.argtypes = vp, [vp]
    lib.ggml_backend_dev_backend_reg.restype, lib.ggml_backend_dev_backend_reg.argtypes = vp, [vp]
    lib.ggml_backend_reg_get_proc_address.restype = vp
    lib.ggml_backend_reg_get_proc_address.argtypes = [vp, ctypes.c_char_p]
    dev = lib.ggml_backend_get_device(backend)
    reg = lib.ggml_backend_dev_backend_reg(dev) if dev else None
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads") if reg else None
    if fn:
        ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int)(fn)(backend, n_threads)
