"""Dynamic batching: images from concurrent requests go through the model together.

Each request puts its decoded images on one asyncio queue and awaits a future per image. One
task takes them off: once a model worker is free it waits for an image, then for more until it
has ``max_batch`` or ``timeout`` has passed since the first (images already queued are taken at
once), and hands the batch to a thread, so the event loop keeps accepting requests while the
model runs (ONNX Runtime and PyTorch release the GIL). Under load the queue fills while the
model is busy, so batches grow by themselves; when idle, an image waits at most ``timeout``.
This is the scheme of Triton's dynamic batcher and TF Serving's batching, in one small class.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class Batcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        timeout: float,
        workers: int,
        observe: Callable[[int, float, list[float]], None],
    ):
        """``run`` maps a batch to one result row per image; ``observe(size, model seconds,
        queue waits)`` hears of every batch."""
        self.run, self.max_batch, self.timeout, self.observe = run, max_batch, timeout, observe
        self.queue: asyncio.Queue[tuple[np.ndarray, float, asyncio.Future]] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="model")
        self.free = asyncio.Semaphore(workers)
        self.task: asyncio.Task | None = None
        self.running: set[asyncio.Task] = set()  # (the loop keeps only weak references to tasks)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._gather())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=True)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """The result rows of ``images`` (one request's), computed in whichever batches they join."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        now = time.perf_counter()
        for image, future in zip(images, futures):
            self.queue.put_nowait((image, now, future))
        return np.stack(await asyncio.gather(*futures))

    async def _gather(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.free.acquire()
            items = [await self.queue.get()]
            deadline = loop.time() + self.timeout
            while len(items) < self.max_batch:
                if not self.queue.empty():
                    items.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            task = loop.create_task(self._compute(items))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _compute(self, items: list[tuple[np.ndarray, float, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            rows = await loop.run_in_executor(self.executor, self.run, np.stack([item[0] for item in items]))
        except Exception as exc:
            for _, _, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self.free.release()
        self.observe(len(items), time.perf_counter() - started, [started - item[1] for item in items])
        for row, (_, _, future) in zip(rows, items):
            if not future.done():  # (its client went away)
                future.set_result(row)
