"""Gathering a replica's concurrent images into the engine's batches.

Ray Serve's `@serve.batch` forms a batch each time its wait window closes, even while the engine
still runs the last one; the batches then queue for the engine. Under load its batches stay as
small as the images that arrive within one window (a mean of about 1 at 10 ms, measured with 16
clients), so the engine never gains what batches give it. `Batcher` forms the next batch when the
engine is free: everything that waited while the engine ran, up to the batch size. An image that
finds the engine idle waits at most the window for others to join it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Calls `run(items)` (a coroutine, one at a time, with at most `max_size` items) and gives
    each caller of `submit` its own result. An exception from `run` goes to every caller of its
    batch; a caller that gave up (its request cancelled) is left out of the next batch."""

    def __init__(self, run: Callable[[list[Item]], Awaitable[list[Result]]], max_size: int, wait_s: float) -> None:
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self.queue: asyncio.Queue[tuple[float, Item, asyncio.Future[Result]]] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        """`item`'s result, once its batch has run."""
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done():  # started in the loop that serves the requests
            self.worker = loop.create_task(self._work())
        future: asyncio.Future[Result] = loop.create_future()
        self.queue.put_nowait((loop.time(), item, future))
        return await future

    async def _work(self) -> None:
        while True:
            batch = [entry for entry in await self._next_batch() if not entry[2].done()]
            if not batch:
                continue
            try:
                results = await self.run([item for _, item, _ in batch])
            except Exception as err:  # the callers' error, not the worker's: it goes on
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, _, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _next_batch(self) -> list[tuple[float, Item, asyncio.Future[Result]]]:
        """The first waiting image and those behind it, up to `max_size`; when fewer are waiting,
        those that arrive until the first one has waited `wait_s`."""
        batch = [await self.queue.get()]
        deadline = batch[0][0] + self.wait_s
        loop = asyncio.get_running_loop()
        while len(batch) < self.max_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                break
        return batch
