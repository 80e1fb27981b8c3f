"""Waiting for an event with a time limit, as the transport's loops do.

One helper, in a module of its own because both of the transport's loops need it:
the drain loop (``agent.runtime.transport``) and the command sync
(``agent.runtime.commands``), which imports nothing of the transport.
"""

from __future__ import annotations

import asyncio


async def wait_at_most(event: asyncio.Event, seconds: float) -> None:
    """Wait for ``event`` at most ``seconds``; a cancellation always propagates.

    Python 3.11's ``asyncio.timeout`` can turn a cancellation that arrives as the
    timeout expires into TimeoutError; a loop that ignored it would never end, and the
    TaskGroup around it (a connection being stopped) would wait for ever.
    """
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None
