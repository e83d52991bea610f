"""The tuner of launch configurations leaves the caller alone: it times on the caller's
stream with CUDA events (no device-wide synchronize, no graph capture, nothing released
from the caching allocator), and every rank of torch.distributed launches the same
configuration, so that results are bitwise equal across ranks."""

from __future__ import annotations

import datetime
import importlib
import os

import pytest
import torch
from ranks import spawn_ranks

pytest.importorskip("triton")
launching = importlib.import_module("stellar_kernels._triton")
CANDIDATES = ["first", "second", "third"]


class Timeline:
    """The GPU as the tuner sees it through torch.cuda's event API: each launch of a
    candidate takes `cost[candidate]` ms of the stream; events read the stream's clock."""

    def __init__(self, cost: dict[str, float]) -> None:
        self.cost, self.clock, self.waited = cost, 0.0, []
        timeline = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                assert enable_timing
                self.at: float | None = None

            def record(self, stream: object = None) -> None:
                assert stream is None, "recorded on another stream than the current one"
                self.at = timeline.clock

            def synchronize(self) -> None:
                timeline.waited.append(self)

            def elapsed_time(self, end: Event) -> float:
                assert timeline.waited, "read before the host waited for the events"
                return end.at - self.at

        self.Event = Event

    def launch(self, candidate: str) -> None:
        self.clock += self.cost[candidate]


def _forbid(monkeypatch, *names: str) -> None:
    for name in names:

        def refuse(*args, name=name, **kwargs):
            raise AssertionError(f"the tuner called torch.cuda.{name}")

        monkeypatch.setattr(torch.cuda, name, refuse)


def test_timing_neither_synchronizes_the_device_nor_flushes_the_allocator(monkeypatch):
    """The fastest candidate, timed with events on the current stream: the host waits for
    the tuner's own last event only; no torch.cuda.synchronize, no empty_cache, no graph
    capture (whose entry does both), no side stream."""
    timeline = Timeline({"first": 3.0, "second": 1.0, "third": 2.0})
    monkeypatch.setattr(torch.cuda, "Event", timeline.Event)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: None, raising=False)
    _forbid(monkeypatch, "synchronize", "empty_cache", "graph", "CUDAGraph", "Stream", "stream")
    monkeypatch.delenv("STELLAR_KERNELS_AUTOTUNE", raising=False)
    key = ("test_tuning", "cuda", 0)
    monkeypatch.delitem(launching.TUNED, key, raising=False)

    got = launching.autotune(key, CANDIDATES, timeline.launch, torch.device("cuda", 0))
    assert got == "second" and launching.TUNED[key] == "second"
    assert len(timeline.waited) == 1, "the host waited more than once"
    assert launching.autotune(key, CANDIDATES, timeline.launch, torch.device("cuda", 0)) == "second"
    assert len(timeline.waited) == 1, "timed again"


@pytest.mark.parametrize("value", ["2", "off", "yes"])
def test_an_unknown_autotune_value_raises(monkeypatch, value):
    monkeypatch.setenv("STELLAR_KERNELS_AUTOTUNE", value)
    with pytest.raises(ValueError, match="STELLAR_KERNELS_AUTOTUNE"):
        launching.autotune(("k",), CANDIDATES, lambda c: None, torch.device("cuda", 0))


def _rank_worker(rank: int, world: int, port: int, queue) -> None:
    """Each rank's choice in every STELLAR_KERNELS_AUTOTUNE mode, where each rank's own
    timings would pick another candidate (rank r: CANDIDATES[r + 1] is fastest)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        tuner = importlib.import_module("stellar_kernels._triton")
        torch.cuda.is_current_stream_capturing = lambda: False
        fastest = CANDIDATES[rank + 1]
        timed = []
        launched = []

        def time_candidates(launch, candidates, reps=20):
            timed.append(list(candidates))
            return [0.5 if c == fastest else 1.0 for c in candidates]

        def gpu_ms(fn, reps=20):  # the tuner's timer before time_candidates
            fn()
            timed.append(launched[-1])
            return 0.5 if launched[-1] == fastest else 1.0

        tuner.time_candidates, tuner.gpu_ms = time_candidates, gpu_ms
        device = torch.device("cuda", rank)  # each rank its own GPU; the group is gloo's
        result = {}
        for mode in ("1", "rank0", "0"):
            os.environ["STELLAR_KERNELS_AUTOTUNE"] = mode
            tuner.TUNED.clear()
            timed.clear()
            got = tuner.autotune(("op", 512), CANDIDATES, launched.append, device)
            again = tuner.autotune(("op", 512), CANDIDATES, launched.append, device)
            uneven = None
            if mode != "rank0":  # uneven batches, keys that differ between ranks: no hang
                uneven = tuner.autotune(("op", 64 << rank), CANDIDATES, launched.append, device)
            result[mode] = (got, again, uneven, len(timed))
        queue.put((rank, result))
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_launches_the_same_configuration():
    """By default under torch.distributed the first candidate, untimed, on every rank (no
    collective, so uneven batches cannot hang a rank); with STELLAR_KERNELS_AUTOTUNE=rank0,
    rank 0's choice on every rank, timed on rank 0 only; with 0 the first, untimed."""
    results = spawn_ranks(_rank_worker, ())
    for rank, result in results.items():
        assert result["1"] == ("first", "first", "first", 0), (rank, result)
        assert result["0"] == ("first", "first", "first", 0), (rank, result)
    rank0 = {rank: result["rank0"] for rank, result in results.items()}
    assert rank0[0][:2] == rank0[1][:2] == ("second", "second"), rank0
    assert rank0[0][3] >= 1 and rank0[1][3] == 0, "timed on a rank other than 0"


# ----------------------------------------------------------------------------- on a GPU


def _tuning_case(monkeypatch) -> tuple[torch.Tensor, tuple]:
    """A cost whose tuning key is new, with every candidate compiled and bound beforehand
    (so that tuning only times), and that key forgotten."""
    import stellar_kernels as sk

    sm = importlib.import_module("stellar_kernels.sinkhorn_match")
    monkeypatch.delenv("STELLAR_KERNELS_AUTOTUNE", raising=False)
    cost = torch.rand(1000, 16, 16, device="cuda")
    key = launching.tune_key("sinkhorn_match", cost.device, cost.dtype, 1000, 16, 16)
    for config in sm.sinkhorn_candidates(16):
        monkeypatch.setitem(launching.TUNED, key, config)
        sk.sinkhorn_match(cost, validate=False)
    monkeypatch.delitem(launching.TUNED, key)
    torch.cuda.synchronize()
    return cost, key


@pytest.mark.gpu
def test_gpu_tuning_keeps_the_allocators_cache(monkeypatch):
    """Memory the caller freed stays reserved by the caching allocator through tuning (a
    torch.cuda.graph capture empties that cache on entry)."""
    import stellar_kernels as sk

    cost, key = _tuning_case(monkeypatch)
    block = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    del block
    reserved = torch.cuda.memory_reserved()
    sk.sinkhorn_match(cost, validate=False)
    assert key in launching.TUNED
    assert torch.cuda.memory_reserved() >= reserved


@pytest.mark.gpu
def test_gpu_tuning_waits_for_its_own_stream_only(monkeypatch):
    """Tuning returns while another stream is still busy: no device-wide synchronize."""
    import stellar_kernels as sk

    cost, key = _tuning_case(monkeypatch)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(launching.HOLD_HZ))  # a second or more on any GPU
    sk.sinkhorn_match(cost, validate=False)
    busy = not side.query()
    side.synchronize()
    assert key in launching.TUNED
    assert busy, "tuning waited for another stream's work"
