"""Batches over worker threads with one kernel thread each: results that no thread count changes.

A float32 (or float64) kernel that splits one reduction over several threads sums in an order that depends on
the thread count, so a model's activations, and every score or log-likelihood computed from them, move in
their last bits when ``OMP_NUM_THREADS`` changes. Run single-threaded, each kernel sums in one fixed order.
``map_batches`` keeps the machine busy another way: on the CPU it runs ``torch.get_num_threads()`` batches at
once, each in its own Python thread (torch releases the GIL inside its kernels) with one kernel thread, and
returns the results in batch order. The caller folds them in that order, so a result depends on the batches
alone, never on how many ran at once::

    batches   b0 b1 b2 b3 b4            (fixed by the data: longest first)
    worker 1  b0    b2    b4            each batch: single-threaded kernels -> the same bytes
    worker 2     b1    b3
    results   r0 r1 r2 r3 r4            in batch order, whatever finished first

On a GPU the batches run one after the other in the calling thread (a GPU kernel's order does not follow the
CPU thread count). The result is the same across thread counts on one kind of CPU; another instruction set
(``ATEN_CPU_CAPABILITY``, a CPU without AVX-512) has other vectorised kernels and may differ in the last bits
(docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import torch

B = TypeVar("B")
R = TypeVar("R")


def workers_for(device: torch.device | str) -> int:
    """How many batches run at once on ``device``: the kernel thread count on the CPU, else one."""
    return max(1, torch.get_num_threads()) if torch.device(device).type == "cpu" else 1


@contextlib.contextmanager
def one_kernel_thread() -> Iterator[int]:
    """Run the block with torch's kernels single-threaded; yields the thread count it had, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def map_batches(fn: Callable[[B], R], batches: Sequence[B], device: torch.device | str) -> Iterator[R]:
    """``fn(batch)`` for every batch, yielded in batch order (module doc).

    On the CPU the calls run in ``workers_for(device)`` threads with single-threaded kernels and the caller's
    gradient mode (``torch.no_grad()`` holds in the workers too: no activations kept for a backward pass);
    ``fn`` must keep any per-batch state of its own (thread-local or returned), never write shared state. Elsewhere the calls
    run in order in this thread. Exceptions propagate from the batch that raised, in order.
    """
    if torch.device(device).type != "cpu":
        yield from (fn(b) for b in batches)
        return
    grad = torch.is_grad_enabled()        # thread-local in torch: a worker starts with gradients on

    def call(batch: B) -> R:
        with torch.set_grad_enabled(grad):
            return fn(batch)

    with one_kernel_thread() as threads:
        if threads <= 1 or len(batches) <= 1:
            yield from (fn(b) for b in batches)
            return
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="diet-batch") as pool:
            futures = [pool.submit(call, b) for b in batches]
            try:
                for future in futures:
                    yield future.result()
            finally:
                for future in futures:       # an error or an interrupt: start nothing new
                    future.cancel()


@contextlib.contextmanager
def single_threaded_on(device: torch.device | str) -> Iterator[None]:
    """Single-threaded kernels on the CPU for the block (a computation whose batches are not ours to spread);
    nothing changes on a GPU."""
    if torch.device(device).type != "cpu":
        yield
        return
    with one_kernel_thread():
        yield
