"""Spawned processes for the distributed tests: gloo ranks that report through a queue."""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable, args: tuple, world: int = 2, timeout: float = 150) -> dict:
    """{rank: result} of `worker(rank, world, port, *args, queue)` run in `world` spawned
    processes, each putting (rank, result) on the queue once. Results should be numpy
    arrays or plain values: a tensor travels through a file descriptor that dies with its
    process if that exits before the parent has read it."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, *args, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = {}
    try:
        for _ in procs:
            rank, result = queue.get(timeout=timeout)
            results[rank] = result
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * world
    return results
