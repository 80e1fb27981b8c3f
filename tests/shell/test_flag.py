"""``Flag`` behaves as ``asyncio.Event`` does: the same random program of sets, clears,
waits and cancellations, run against both, wakes the same waiters in the same order."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.runtime.waits import Flag, wait_at_most

OPS = st.lists(
    st.sampled_from(["set", "clear", "wait", "wait", "cancel", "tick"]), min_size=1, max_size=30
)


async def _play(flag: asyncio.Event | Flag, ops: list[str]) -> list[object]:
    seen: list[object] = []
    waiters: list[asyncio.Task[None]] = []

    async def waiter(n: int) -> None:
        await flag.wait()
        seen.append(("woke", n, flag.is_set()))

    for op in ops:
        if op == "set":
            flag.set()
        elif op == "clear":
            flag.clear()
        elif op == "wait":
            waiters.append(asyncio.create_task(waiter(len(waiters))))
        elif op == "cancel" and waiters:
            waiters[len(waiters) // 2].cancel()
        await asyncio.sleep(0)  # "tick" and every op: let the woken run
        seen.append(("state", flag.is_set()))
    flag.set()
    async with asyncio.timeout(5):  # a waiter never woken fails, not hangs
        await asyncio.gather(*waiters, return_exceptions=True)
    seen.append([w.cancelled() for w in waiters])
    return seen


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_a_flag_acts_as_an_event(ops: list[str]) -> None:
    assert asyncio.run(_play(Flag(), ops)) == asyncio.run(_play(asyncio.Event(), ops))


@pytest.mark.asyncio
async def test_waiting_at_most_returns_at_the_limit_or_when_set() -> None:
    flag = Flag()
    await wait_at_most(flag, 0.01)  # not set: returns at the limit
    asyncio.get_running_loop().call_later(0.01, flag.set)
    await wait_at_most(flag, 30)
    assert flag.is_set()
