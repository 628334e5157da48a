"""``--devices`` into engine slots, the cores split between them, the start order and the restart backoff."""

from __future__ import annotations

import time

import pytest

from producer.errors import BadInput
from worker.hosting import devices
from worker.hosting.devices import DeviceSlot, plan_slots, split_cores
from worker.hosting.engine_process import slot_spec
from worker.hosting.host import WorkerSpec
from worker.hosting.supervisor import BACKOFF_MAX_S, STABLE_S, EngineChild, Supervisor, backoff, waves


def test_cores_split_into_disjoint_contiguous_groups() -> None:
    assert split_cores(list(range(16)), 8) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15)]
    assert split_cores(list(range(7)), 3) == [(0, 1, 2), (3, 4), (5, 6)]
    assert split_cores([4, 5], 3) == [(4,), (5,), (4,)]  # more engines than cores: shared, one each


def test_cpu_split_gives_each_engine_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "host_cores", lambda: [0, 1, 2, 3])
    slots = plan_slots("cpu:2", "cpu")
    assert slots == [DeviceSlot("cpu:0", "cpu", (0, 1)), DeviceSlot("cpu:1", "cpu", (2, 3))]
    assert plan_slots("cpu:2", "auto") == slots
    with pytest.raises(BadInput, match="splits the CPU, but --device is cuda"):
        plan_slots("cpu:2", "cuda")
    with pytest.raises(BadInput, match="at least 1"):
        plan_slots("cpu:0", "cpu")


def test_gpus_default_to_every_visible_one_and_indices_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "host_cores", lambda: list(range(8)))
    monkeypatch.setattr(devices, "visible_gpus", lambda: 4)
    every = plan_slots(None, "cuda")
    assert [s.label for s in every] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [s.cores for s in every] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [s.label for s in plan_slots(None, "auto")] == [s.label for s in every]
    assert [s.device for s in plan_slots("0,1,3", "cuda")] == ["cuda:0", "cuda:1", "cuda:3"]
    assert [s.device for s in plan_slots("1-2", "auto")] == ["cuda:1", "cuda:2"]
    assert plan_slots(None, "cuda:2") == [DeviceSlot("cuda:2", "cuda:2")]  # one named device: one process
    with pytest.raises(BadInput, match="GPU 4 is not visible; this process sees 4"):
        plan_slots("0,4", "cuda")
    with pytest.raises(BadInput, match="not a device number"):
        plan_slots("0,x", "cuda")
    with pytest.raises(BadInput, match="for CPU engines: --devices cpu:N"):
        plan_slots("0,1", "cpu")


def test_two_engines_on_one_gpu_share_its_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "host_cores", lambda: [0, 1])
    monkeypatch.setattr(devices, "visible_gpus", lambda: 1)
    slots = plan_slots("0,0", "cuda")
    assert [(s.device, s.share, s.cores) for s in slots] == [("cuda:0", 2, (0,)), ("cuda:0", 2, (1,))]
    spec = slot_spec(WorkerSpec(device="cuda", memory_fraction=0.8), slots[0])
    assert spec.device == "cuda:0" and spec.memory_fraction == pytest.approx(0.4)
    alone = slot_spec(WorkerSpec(device="cuda"), DeviceSlot("cuda:1", "cuda:1"))
    assert alone.device == "cuda:1" and alone.memory_fraction is None  # the setting's default, unchanged
    assert waves(slots) == [[0], [1]]  # the second profiles the device after the first has loaded


def test_no_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "visible_gpus", lambda: 0)
    with pytest.raises(BadInput, match="no CUDA GPU is visible"):
        plan_slots("0,1", "cuda")
    assert plan_slots(None, "auto") == [DeviceSlot("auto", "auto")]  # as before: one engine, device auto


def test_neuron_cores_from_the_runtimes_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "host_cores", lambda: [0, 1, 2, 3])
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0-2,5")
    assert [s.device for s in plan_slots(None, "neuron")] == ["neuron:0", "neuron:1", "neuron:2", "neuron:5"]
    assert [s.device for s in plan_slots("0-1,2-3", "neuron")] == ["neuron:0-1", "neuron:2-3"]
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "3-1")
    with pytest.raises(BadInput, match="runs backwards"):
        plan_slots(None, "neuron")


def test_start_order_and_backoff() -> None:
    slots = [DeviceSlot(f"cuda:{i}", f"cuda:{i}") for i in (0, 1, 0, 1, 2)]
    assert waves(slots) == [[0, 1, 4], [2, 3]]
    assert [backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff(20) == BACKOFF_MAX_S


class FakeProcess:
    """What the supervisor reads of an exited child."""

    def __init__(self, exitcode: int) -> None:
        self.exitcode = exitcode


def reaped(child: EngineChild, exitcode: int, stopping: bool = False) -> int | None:
    supervisor = Supervisor([child.slot], WorkerSpec(), "redis://unused")
    if stopping:
        supervisor._stop.set()
    child.process = FakeProcess(exitcode)
    return supervisor._reap(child)


def test_a_first_start_that_fails_ends_the_worker_with_its_code() -> None:
    child = EngineChild(DeviceSlot("cpu:0", "cpu"), last={"error": "model 'x': not a directory", "code": 2})
    assert reaped(child, 2) == 2
    assert child.restart_at is None


def test_an_engine_that_served_is_restarted_with_growing_backoff() -> None:
    child = EngineChild(DeviceSlot("cuda:1", "cuda:1"), ever_ready=True, ready_at=time.monotonic(),
                        started_at=time.monotonic())
    delays = []
    for _ in range(3):
        before = time.monotonic()
        assert reaped(child, -9) is None
        assert child.restart_at is not None
        delays.append(round(child.restart_at - before))
    assert delays == [1, 2, 4] and child.failures == 3
    child.ready_at = time.monotonic() - STABLE_S - 1  # served a while this time: back to the shortest wait
    assert reaped(child, 1) is None and child.failures == 1


def test_no_restart_while_stopping() -> None:
    child = EngineChild(DeviceSlot("cpu:0", "cpu"), ever_ready=True, ready_at=time.monotonic())
    assert reaped(child, 0, stopping=True) is None and child.restart_at is None
