"""SIGUSR1 (service/stacks.py): a running server writes its threads' stacks, then one log line
per asyncio task with the coroutines it waits in and one per open HTTP connection, and goes on
serving; a request waiting
for its upstream is found in its relay; `--workers N` passes the signal to every worker."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx

from service.stacks import await_chain, catches

from .conftest import children, new_user, stack_lines, start_bridge, start_workers, stream_started


def test_a_chain_is_followed_through_every_coroutine_a_task_awaits():
    async def innermost(event: asyncio.Event) -> None:
        await event.wait()

    async def middle(event: asyncio.Event) -> None:
        await innermost(event)

    async def outer(event: asyncio.Event) -> None:
        await middle(event)

    async def main() -> tuple[list[str], str]:
        event = asyncio.Event()
        task = asyncio.create_task(outer(event))
        await asyncio.sleep(0)
        found = await_chain(task)
        event.set()
        await task
        return found
    chain, awaits = asyncio.run(main())
    names = [frame.rsplit(" ", 1)[1] for frame in chain]
    # Task.get_stack would give only `outer`
    assert names == ["outer", "middle", "innermost", "wait"]
    assert awaits == "Future"


def test_a_server_dumps_its_stacks_on_sigusr1_and_goes_on_serving(fresh_database, simulator):
    server = start_bridge(fresh_database, simulator.url + "/api/coding/paas/v4")
    try:
        key = new_user(fresh_database)
        # a stream whose upstream sends a token a second
        reader, received = stream_started(server, key, "[[sim tps=1 tokens=6 reasoning=0]]")
        text = server.stacks()
        # the threads, from faulthandler: written whatever the event loop is doing
        assert "most recent call first" in text and "service/cli.py" in text
        lines = stack_lines(text)
        tasks = lines[0]["count"]
        assert lines[0]["msg"] == "asyncio tasks" and [e["msg"] for e in lines[1:tasks + 1]] == ["asyncio task"] * tasks
        # the stream's task, suspended in its relay, reading the upstream
        relaying = [entry for entry in lines[1:tasks + 1] if "bridge/journey.py" in entry["chain"]]
        assert len(relaying) == 1 and " _relay" in relaying[0]["chain"], lines
        # then the HTTP connections: the stream's, its answer started and not complete (its
        # headers are not logged)
        connections = lines[tasks + 1:]
        assert connections[0]["msg"] == "http connections" and len(connections) == 1 + connections[0]["count"]
        streaming = [e for e in connections[1:] if e.get("request") == "POST /v1/chat/completions"]
        assert len(streaming) == 1, connections
        assert streaming[0]["response_started"] and not streaming[0]["response_complete"], streaming
        assert not streaming[0]["reading_paused"] and streaming[0]["pipelined"] == 0
        assert key not in text
        assert server.process is not None and server.process.poll() is None
        assert httpx.get(server.url + "/healthz").status_code == 200
        reader.join(30)
        assert [line for line in received if line][-1] == "data: [DONE]"
    finally:
        server.stop()


def test_the_supervisor_of_workers_passes_the_signal_on_to_each_of_them(fresh_database, simulator):
    server = start_workers(fresh_database, simulator.url + "/api/coding/paas/v4", 2)
    try:
        assert server.process is not None
        # the workers started, each catching the signal (the supervisor passes it on only then)
        deadline = time.monotonic() + 30
        while len(workers := [pid for pid in children(server.process.pid) if catches(pid)]) < 2:
            assert time.monotonic() < deadline, workers
            time.sleep(0.1)
        start = len(server.output())
        server.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while len([e for e in stack_lines(server.output()[start:]) if e["msg"] == "asyncio tasks"]) < 3:
            assert time.monotonic() < deadline, server.output()[start:]
            time.sleep(0.1)
        # the supervisor's and each worker's, from three processes, and all of them still serve
        assert server.output()[start:].count("Current thread ") == 3
        assert httpx.get(server.url + "/readyz").status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(40) == 0
    finally:
        server.stop()


def test_only_a_process_that_catches_the_signal_is_said_to():
    """A new process has SIGUSR1's default action (it ends the process) until `codeplan` ignores
    it, then catches it: the supervisor passes the signal on only then."""
    default = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"]
    ignoring = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGUSR1, signal.SIG_IGN);"
                " print('ready', flush=True); time.sleep(30)"]
    catching = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGUSR1, lambda *a: None);"
                " print('ready', flush=True); time.sleep(30)"]
    # (each starts with the default action, whatever this test process does with the signal)
    started = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_DFL))
               for args in (default, ignoring, catching)]
    try:
        for process in started:
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        assert [catches(p.pid) for p in started] == [False, False, True]
        assert not catches(2 ** 22 + 1)  # no such process
    finally:
        for process in started:
            process.kill()
            process.wait()
