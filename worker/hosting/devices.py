"""The devices one worker host runs engines on, and each engine's share of the host.

``--devices`` names them; without it a worker uses every accelerator it can see:

* GPUs: ``0,1,3`` are indices as this process sees them, so ``CUDA_VISIBLE_DEVICES`` is honoured
  by torch itself (with ``CUDA_VISIBLE_DEVICES=2,3``, ``--devices 1`` is physical GPU 3);
  ``0,0`` runs two engines on one GPU. The default for ``--device cuda`` (and ``auto`` when a GPU
  is visible) is every visible GPU.
* NeuronCores: ``0,1`` or ``0-1`` (a range in one entry is one engine on a group of cores); the
  default for ``--device neuron`` is each core ``NEURON_RT_VISIBLE_CORES`` names.
* CPU: ``cpu:N`` splits the host's cores into N engines, for hosts with many cores (one engine
  on 64 cores scales worse than four on 16, as torch's intra-op threads do).

Each engine runs in its own process (``worker.hosting.supervisor``): a ``DeviceSlot`` says what
that process is given: its device, the CPU cores it is pinned to (its tokenizer and torch threads
follow them), and how many engines share its device (they split the memory the batch budget may
use). Nothing here imports torch unless GPUs must be counted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from producer.errors import BadInput
from producer.settings import env

_CPU_SPLIT = re.compile(r"^cpu:(\d+)$")
_ENTRY = re.compile(r"^(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class DeviceSlot:
    """One engine process: where it runs and its share of the host."""

    #: how the host names it, in logs, /health, /v1/models, metrics and done-markers (``cuda:1``, ``cpu:0``)
    label: str
    #: what the backend is given (``--device``)
    device: str
    #: the CPU cores the process is pinned to (empty: not pinned)
    cores: tuple[int, ...] = ()
    #: engines on the same device, this one included: each takes 1/share of the memory fraction
    share: int = 1

    def memory_fraction(self, fraction: float) -> float:
        """This engine's part of the free-memory fraction when several engines share its device."""
        return fraction / self.share


def host_cores() -> list[int]:
    """The cores this process may run on (cgroup and affinity aware)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return list(range(os.cpu_count() or 1))


def split_cores(cores: list[int], n: int) -> list[tuple[int, ...]]:
    """``n`` contiguous, disjoint groups of ``cores`` (sizes differ by at most one); with more
    engines than cores, each engine gets one core and cores are shared round-robin."""
    if n < 1:
        raise ValueError("split_cores needs n >= 1")
    if n > len(cores):
        return [(cores[i % len(cores)],) for i in range(n)]
    size, extra = divmod(len(cores), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        groups.append(tuple(cores[start:end]))
        start = end
    return groups


def visible_gpus() -> int:
    """CUDA devices this process can see (``CUDA_VISIBLE_DEVICES`` applied by the driver)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a worker dependency
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def neuron_cores() -> list[str]:
    """The NeuronCores ``NEURON_RT_VISIBLE_CORES`` names, one entry per core (``0-3,6`` -> 0,1,2,3,6)."""
    raw = env("NEURON_RT_VISIBLE_CORES")
    if not raw:
        return []
    cores: list[str] = []
    for entry in raw.replace(" ", "").split(","):
        low, high = _range(entry, "NEURON_RT_VISIBLE_CORES")
        cores.extend(str(c) for c in range(low, high + 1))
    return cores


def _range(entry: str, where: str) -> tuple[int, int]:
    match = _ENTRY.match(entry)
    if not match:
        raise BadInput(f"{where}: {entry!r} is not a device number or a range like 0-3", param="devices")
    low, high = int(match.group(1)), int(match.group(2) or match.group(1))
    if high < low:
        raise BadInput(f"{where}: the range {entry!r} runs backwards", param="devices")
    return low, high


def plan_slots(devices: str | None, device: str) -> list[DeviceSlot]:
    """The engine processes for ``--devices`` and ``--device``: one slot means one process, as
    before (no supervisor); several mean one pinned process each."""
    kind = device.partition(":")[0]
    if devices is not None and devices.strip():
        return _named_slots(devices.strip(), device, kind)
    if device in ("cuda", "auto"):
        count = visible_gpus()
        if count > 1:
            return _gpu_slots(list(range(count)))
    if device == "neuron":
        cores = neuron_cores()
        if len(cores) > 1:
            return _neuron_slots(cores)
    return [DeviceSlot(label=device, device=device)]


def _named_slots(devices: str, device: str, kind: str) -> list[DeviceSlot]:
    split = _CPU_SPLIT.match(devices)
    if split:
        if kind not in ("cpu", "auto"):
            raise BadInput(f"--devices {devices} splits the CPU, but --device is {device}", param="devices")
        n = int(split.group(1))
        if n < 1:
            raise BadInput("--devices cpu:N: N must be at least 1", param="devices")
        cores = split_cores(host_cores(), n)
        return [DeviceSlot(label=f"cpu:{i}", device="cpu", cores=group, share=1) for i, group in enumerate(cores)]
    if device not in ("auto", "cuda", "neuron"):
        hint = " (for CPU engines: --devices cpu:N)" if kind == "cpu" else ""
        raise BadInput(f"--devices {devices} needs --device cuda, neuron or auto, not {device}{hint}",
                       param="devices")
    entries = [e for e in devices.replace(" ", "").split(",") if e]
    if not entries:
        raise BadInput(f"--devices {devices!r}: name at least one device", param="devices")
    if device == "neuron":
        for entry in entries:
            _range(entry, "--devices")
        return _neuron_slots(entries)
    indices = []
    for entry in entries:
        low, high = _range(entry, "--devices")
        indices.extend(range(low, high + 1))
    count = visible_gpus()
    if count == 0:
        raise BadInput(f"--devices {devices}: no CUDA GPU is visible to this process "
                       f"(CUDA_VISIBLE_DEVICES={env('CUDA_VISIBLE_DEVICES')!r}); for CPU engines use --devices cpu:N",
                       param="devices")
    wrong = [i for i in indices if i >= count]
    if wrong:
        raise BadInput(f"--devices {devices}: GPU {wrong[0]} is not visible; this process sees {count} "
                       f"(indices 0-{count - 1}, after CUDA_VISIBLE_DEVICES)", param="devices")
    return _gpu_slots(indices)


def _gpu_slots(indices: list[int]) -> list[DeviceSlot]:
    cores = split_cores(host_cores(), len(indices))
    return [DeviceSlot(label=f"cuda:{i}", device=f"cuda:{i}", cores=group, share=indices.count(i))
            for i, group in zip(indices, cores)]


def _neuron_slots(entries: list[str]) -> list[DeviceSlot]:
    cores = split_cores(host_cores(), len(entries))
    return [DeviceSlot(label=f"neuron:{e}", device=f"neuron:{e}", cores=group, share=entries.count(e))
            for e, group in zip(entries, cores)]
