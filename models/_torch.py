"""Small torch helpers shared by the backends: device/dtype choice, hashing, image conversion."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "default_device",
    "default_dtype",
    "resolve_device",
    "resolve_dtype",
    "bf16_supported_on_cpu",
    "sha256_file",
    "to_pil",
    "sampler_generator",
]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """``DPRDM_DEVICE`` when set, else the first available of CUDA, MPS (Apple GPUs), CPU."""
    name = os.environ.get("DPRDM_DEVICE")
    if name:
        return resolve_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable torch device from a name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) or ``None`` (auto).

    Raises:
        ValueError: naming an unknown device or one this machine does not have.
    """
    if device is None:
        return default_device()
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available: torch.cuda.is_available() is False")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {str(device)!r} is not available: torch.backends.mps.is_available() is False")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {str(device)!r}; expected cpu, cuda, cuda:N or mps")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU; on CUDA bf16 where supported, else fp16; fp16 on MPS. ``DPRDM_DTYPE`` overrides."""
    name = os.environ.get("DPRDM_DTYPE")
    if name:
        return resolve_dtype(name, device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (or a torch dtype); ``None`` for :func:`default_dtype`.

    Raises:
        ValueError: naming an unknown dtype.
    """
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")


def bf16_supported_on_cpu() -> bool:
    """Whether this torch runs a bf16 matmul and convolution on the CPU (for tests)."""
    try:
        x = torch.ones(1, 1, 4, 4, dtype=torch.bfloat16)
        torch.nn.functional.conv2d(x, torch.ones(1, 1, 3, 3, dtype=torch.bfloat16))
        (x.flatten(1) @ x.flatten(1).T).sum().item()
    except (RuntimeError, TypeError):
        return False
    return True


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes.

    Raises:
        FileNotFoundError: naming the path when it does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    h = hashlib.sha256()
    with p.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(n, 3, h, w)`` tensor in [-1, 1] to PIL RGB images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).cpu().numpy()), "RGB") for a in arr]


def sampler_generator(seed: int | None) -> torch.Generator:
    """The diffusion sampler's generator (CPU, so results match across devices).

    A client seed drives only this generator; ``None`` draws a fresh seed from ``os.urandom``.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or None; found {seed!r}")
    return torch.Generator(device="cpu").manual_seed(seed)
