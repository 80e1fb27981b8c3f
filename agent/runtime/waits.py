"""Flags and waiting for one with a time limit, as the transport's loops do.

In a module of its own because both of the transport's loops need them: the drain
loop (``agent.runtime.transport``) and the command sync (``agent.runtime.commands``),
which imports nothing of the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal


class Flag:
    """``asyncio.Event``'s interface (``set``, ``clear``, ``is_set``, ``wait``) without
    its cost at rest: an Event keeps a deque of waiters and an instance dict from birth
    (about 370 bytes), a transport has five, a fleet of 10,000 has 50,000 and almost
    none has a waiter at any moment. A Flag makes its list of waiters at the first wait.
    """

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return self._value

    def set(self) -> None:
        """Set the flag and wake every waiter."""
        if self._value:
            return
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        """Clear the flag; waiters wait until it is set again."""
        self._value = False

    async def wait(self) -> Literal[True]:
        """Return True once the flag is set (at once if it is)."""
        if self._value:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            if self._waiters is not None:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)


async def wait_at_most(event: asyncio.Event | Flag, seconds: float) -> None:
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
