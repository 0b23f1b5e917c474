"""One place where device and dtype are decided, for every package (clustering, experts, tasks, pipeline)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corpus.io import InputError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")  # what `resolve_device` takes (also 'cuda:N'); the pipeline's --device choices


@dataclass(frozen=True)
class DeviceSetup:
    device: torch.device
    dtype: torch.dtype  # compute dtype used under autocast (bf16 on CUDA when supported, else fp32)

    def autocast(self):
        """Context manager: bf16 autocast on CUDA, a no-op on CPU."""
        import torch

        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast(device_type="cuda", dtype=self.dtype)
        return contextlib.nullcontext()


def resolve_device(device: str | torch.device = "auto") -> DeviceSetup:
    """'auto' → cuda if available else cpu; 'cpu'; 'cuda' or 'cuda:N' (error if CUDA is absent)."""
    import torch

    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for CUDA, but torch sees no GPU (torch {torch.__version__})")
    dev = torch.device(name)
    dtype = torch.float32
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    return DeviceSetup(dev, dtype)
