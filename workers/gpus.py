"""Discover a machine's GPUs through NVML (``--gpus auto``)."""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import GpuBrokerError


class GpuDetectionError(GpuBrokerError):
    """NVML could not tell what GPUs this machine has."""


@dataclass(frozen=True)
class GpuInventory:
    count: int
    memory_mb: int  # of the smallest GPU, so every index can honour it
    model: str


def detect() -> GpuInventory:
    """Count the GPUs NVML sees; raises GpuDetectionError with the reason when it cannot."""
    try:
        import pynvml  # optional at import time: CPU-only machines lack the driver
    except ImportError as exc:
        raise GpuDetectionError("--gpus auto needs nvidia-ml-py (pip install nvidia-ml-py)") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise GpuDetectionError(f"--gpus auto: NVML is not available here ({exc}); give --gpus N instead") from exc
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return GpuInventory(0, 0, "")
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        memory = min(pynvml.nvmlDeviceGetMemoryInfo(h).total for h in handles) // (1024 * 1024)
        model = pynvml.nvmlDeviceGetName(handles[0])
        model = model.decode() if isinstance(model, bytes) else model
        return GpuInventory(count, int(memory), model)
    finally:
        pynvml.nvmlShutdown()
