"""How a serve replica gathers images into the engine's batches (`cvt.serve.batching`, no Ray
needed): the images that wait while the engine runs form the next batch together."""

import asyncio

import pytest

from cvt.serve.batching import Batcher


class Engine:
    """A stand-in engine that records its batches and, while `hold` is set, keeps its first
    batch running until `release` is called."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.running = asyncio.Event()
        self.released = asyncio.Event()
        if not hold:
            self.released.set()

    async def run(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        self.running.set()
        await self.released.wait()
        if "bad" in map(str, items):
            raise ValueError("a bad batch")
        return [item * 10 for item in items]


async def busy(max_size: int, wait_s: float) -> tuple[Engine, Batcher, asyncio.Future]:
    """A held engine, its batcher, and the call whose batch ([1]) the engine is running."""
    engine = Engine(hold=True)
    batcher = Batcher(engine.run, max_size=max_size, wait_s=wait_s)
    first = asyncio.ensure_future(batcher.submit(1))
    await engine.running.wait()
    return engine, batcher, first


def test_images_that_wait_while_the_engine_runs_form_the_next_batch():
    async def scenario():
        engine, batcher, first = await busy(max_size=4, wait_s=0.001)
        later = []
        for n in range(2, 7):  # one at a time, each after the last one's wait window has closed
            later.append(asyncio.ensure_future(batcher.submit(n)))
            await asyncio.sleep(0.01)
        engine.released.set()
        return await asyncio.gather(first, *later), engine.batches

    results, batches = asyncio.run(scenario())
    assert results == [10, 20, 30, 40, 50, 60]  # each caller gets its own result
    assert batches == [[1], [2, 3, 4, 5], [6]]  # not one batch per window, none over max_size


def test_an_image_that_finds_the_engine_idle_waits_for_others_up_to_the_window():
    async def scenario(wait_s: float):
        engine = Engine()
        batcher = Batcher(engine.run, max_size=2, wait_s=wait_s)
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.submit(2))
        await asyncio.gather(first, second)
        return engine.batches

    assert asyncio.run(scenario(wait_s=30)) == [[1, 2]]  # full before the window closed: runs then
    assert asyncio.run(scenario(wait_s=0)) == [[1], [2]]


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_still_runs():
    async def scenario():
        engine, batcher, first = await busy(max_size=8, wait_s=0)
        bad = [asyncio.ensure_future(batcher.submit(item)) for item in ("bad", 3)]
        engine.released.set()
        outcomes = await asyncio.gather(first, *bad, return_exceptions=True)
        return outcomes, await batcher.submit(4)

    outcomes, after = asyncio.run(scenario())
    assert outcomes[0] == 10
    assert [type(o) for o in outcomes[1:]] == [ValueError, ValueError]
    assert after == 40


def test_a_caller_that_gave_up_is_left_out_of_the_next_batch():
    async def scenario():
        engine, batcher, first = await busy(max_size=8, wait_s=0)
        gone, kept = asyncio.ensure_future(batcher.submit(2)), asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0)
        gone.cancel()  # its client disconnected
        engine.released.set()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await asyncio.gather(first, kept), engine.batches

    assert asyncio.run(scenario()) == ([10, 30], [[1], [3]])
