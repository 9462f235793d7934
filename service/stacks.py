"""What a running process is doing, on SIGUSR1 (`kill -USR1 <pid>`), without a debugger:

1. every thread's Python stack, written to stderr from the signal handler itself
   (`faulthandler`): it is written even while the event loop is stuck in one call, where
   nothing else in the process would run;
2. then, as soon as the event loop is free, one JSON log line per asyncio task with the chain
   of coroutines it is suspended in (outermost first) and the type of the future it waits
   on. A request's task says where that request waits (`asyncio.Task.get_stack` gives only
   one frame of a suspended coroutine, so the chain is followed through `cr_await`);
3. and one line per open HTTP connection with its request's state: a request read but not yet
   started has no task (uvicorn queues a pipelined one, and stops reading, until the answer
   before it is complete), and one the server never read shows as reading paused or as an
   idle connection.

A request that hangs with nothing logged is then placed: a stuck loop shows in (1), a request
waiting on something that never comes in (2). `codeplan run --workers N` passes the signal on
to its workers (signal the supervisor only), each once it catches the signal: one still
starting would die of it. Nothing here costs anything until the signal comes.
"""
from __future__ import annotations

import asyncio
import faulthandler
import gc
import inspect
import logging
import signal
from pathlib import Path
from typing import Callable

log = logging.getLogger("codeplan.stacks")

# deep enough for a request's chain (uvicorn -> app -> journey -> ledger future), bounded so a
# runaway recursion logs a line, not megabytes
_MAX_DEPTH = 40


# run after the tasks are logged, each time (the workers' supervisor passes the signal on)
also: list[Callable[[], None]] = []


def install() -> None:
    """Answer SIGUSR1 in the running loop's process."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        for step in (log_tasks, log_connections, *also):
            try:
                step()
            except Exception:  # noqa: BLE001 - one failing step must not keep the others
                log.exception("stack dump step failed")
    # the loop's handler first: faulthandler's, registered after it, dumps the threads and then
    # passes the signal on to it (chain); registered the other way round, the loop's
    # `signal.signal` would replace faulthandler's
    loop.add_signal_handler(signal.SIGUSR1, on_signal)
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)


def catches(pid: int) -> bool:
    """Whether process `pid` catches SIGUSR1 now, so a signal gets its stacks (Linux: /proc). A
    process still starting has the default action, and the signal would end it; one that only
    ignores it yet (service/cli.py `main`, until `install`) would drop it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((int(line.split(":")[1], 16) for line in status.splitlines() if line.startswith("SigCgt:")), 0)
    return bool(caught & 1 << (signal.SIGUSR1 - 1))


def log_tasks() -> None:
    tasks = asyncio.all_tasks()
    log.warning("asyncio tasks", extra={"count": len(tasks)})
    for task in tasks:
        chain, awaiting = await_chain(task)
        log.warning("asyncio task", extra={"task": task.get_name(), "chain": " > ".join(chain),
                                           "awaits": awaiting})


def log_connections() -> None:
    """One line per HTTP connection uvicorn's httptools protocol holds open (found through the
    garbage collector: nothing is kept for this on any request's path), without its headers."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    connections = [o for o in gc.get_objects() if isinstance(o, HttpToolsProtocol)
                   and getattr(o, "transport", None) is not None]
    log.warning("http connections", extra={"count": len(connections)})
    for connection in connections:
        transport, cycle = connection.transport, connection.cycle
        state = {"peer": f"{connection.client[0]}:{connection.client[1]}" if connection.client else "",
                 "closing": transport.is_closing(), "pipelined": len(connection.pipeline),
                 "reading_paused": connection.flow.read_paused,
                 "writing_paused": connection.flow.write_paused,
                 "unsent_bytes": transport.get_write_buffer_size(),
                 "keep_alive_timer": connection.timeout_keep_alive_task is not None}
        if cycle is not None:
            state.update(request=f"{cycle.scope['method']} {cycle.scope['path']}",
                         body_complete=not cycle.more_body, response_started=cycle.response_started,
                         response_complete=cycle.response_complete, disconnected=cycle.disconnected)
        log.warning("http connection", extra=state)


def await_chain(task: asyncio.Task) -> tuple[list[str], str]:
    """The frames `task` is suspended in, outermost first (`file:line function`), and the type
    of what it waits for (a Future, for a sleep, a lock, a read ...)."""
    chain: list[str] = []
    current: object = task.get_coro()
    while current is not None and len(chain) < _MAX_DEPTH:
        frame = (getattr(current, "cr_frame", None) or getattr(current, "gi_frame", None)
                 or getattr(current, "ag_frame", None))
        if frame is None:
            break
        chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        current = (getattr(current, "cr_await", None) or getattr(current, "gi_yieldfrom", None)
                   or getattr(current, "ag_await", None))
        if type(current).__name__ in ("async_generator_asend", "async_generator_athrow"):
            # `async for` over an async generator (a stream's body) awaits one of these, which
            # do not name their generator; the garbage collector's view of them does
            current = next((r for r in gc.get_referents(current) if inspect.isasyncgen(r)), None)
    # the future the task's innermost coroutine yielded (the chain ends at its iterator); its
    # type only: a repr could carry a request's data, and logs carry no secrets
    waiter = getattr(task, "_fut_waiter", None)
    return chain, "" if waiter is None else type(waiter).__name__
