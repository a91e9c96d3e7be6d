"""How work reaches the engine thread: a queue of commands, each applied between two steps.

A command is `apply(session, prepared)`, optionally preceded by `prepare()` in a worker pool (decoding,
features, tokenizing: CPU work that must block neither an event loop nor the step loop). The queue is the only
way in, so the engine thread alone ever touches slots, caches and replies and no lock is held across a step.
Commands of one conversation are numbered by their caller and applied in that order even when their
preparations finish out of order (`InOrder`).
"""

from __future__ import annotations

import concurrent.futures
import queue
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from chroma_agent.engine.conversation import Pending


class Command(NamedTuple):
    """One command, prepared: `apply(session, value)` resolves `future` (or `error` from `prepare` does)."""

    apply: Callable
    value: Any
    error: BaseException | None
    future: Pending


#: What waits in the queue: (session id, its caller's sequence number, the command).
Queued = tuple[str | None, int | None, Command]


def settle(future: concurrent.futures.Future, *, result: Any = None, exc: BaseException | None = None) -> bool:
    """Resolve `future` unless its caller cancelled it; False if it was cancelled."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        return False
    return True


def run_command(command: Command, session: Any) -> None:
    """Apply one command and resolve its future; a bad command fails its caller only."""
    if command.error is not None:
        settle(command.future, exc=command.error)
        return
    try:
        result = command.apply(session, command.value)
    except Exception as error:
        settle(command.future, exc=error)
        return
    settle(command.future, result=result)


class CommandQueue:
    """Many producers (any thread or loop), one consumer (the engine thread)."""

    def __init__(self, pool: concurrent.futures.Executor):
        self._queue: queue.SimpleQueue[Queued | None] = queue.SimpleQueue()
        self._pool = pool

    def post(self, session_id: str | None, seq: int | None, apply: Callable, prepare: Callable | None,
             future: Pending) -> None:
        if prepare is None:
            self._queue.put((session_id, seq, Command(apply, None, None, future)))
            return

        def prepared(job: concurrent.futures.Future) -> None:
            exc = job.exception()
            self._queue.put((session_id, seq, Command(apply, None if exc else job.result(), exc, future)))

        try:
            self._pool.submit(prepare).add_done_callback(prepared)
        except RuntimeError as exc:  # the pool is shut down
            settle(future, exc=RuntimeError(f"the engine is closed ({exc})"))

    def wake(self) -> None:
        """Make a waiting `drain` return (a no-op command)."""
        self._queue.put(None)

    def drain(self, timeout: float | None) -> Iterator[Queued]:
        """The commands queued now; with a `timeout`, first wait up to that long for one."""
        try:
            item = self._queue.get(timeout=timeout) if timeout is not None else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                yield item
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return


class InOrder:
    """One conversation's commands, released in the order their callers numbered them."""

    def __init__(self) -> None:
        self.next_seq = 0
        self.held: dict[int, Command] = {}

    def add(self, seq: int, command: Command) -> Iterator[Command]:
        """Hold `command`; yield every command that is now due, in order."""
        self.held[seq] = command
        while self.next_seq in self.held:
            command = self.held.pop(self.next_seq)
            self.next_seq += 1
            yield command

    def drop(self) -> list[Pending]:
        """Forget the held commands (the conversation closed); their futures, to be failed."""
        futures = [command.future for command in self.held.values()]
        self.held.clear()
        return futures
