"""The bench's upstream: `python -m bench.instant --port P`, the GLM simulator with an instant
answer for non-streaming chat completions.

Issue 15 measured every gateway against "an instant fake upstream": one that costs next to
nothing per request, so that the figures are the gateway's and not the upstream's. The simulator
is not that: it decodes each request, plans its answer from the prompt's directives and encodes
it, ~0.3-0.45 ms of CPU per request here, on the core it shares with the load generator and, in
the bridge's runs, with PostgreSQL (an instant answer: ~0.05 ms). So this front records the
simulator's answer to the first non-streaming completion it is sent and replays it, body and
headers, to every later one; streaming requests (the bench's streams and idle streams, whose
directives matter), requests that ask for a delay (`ttft=` in their directive: the bench's
slower-upstream rows) and everything else go to the simulator itself, in this process. Served like
the bridge: uvicorn with httptools and uvloop. For the benchmarks only: it checks no key and
answers every non-streaming request alike, whatever it asks, so no test may use it.
"""
from __future__ import annotations

import argparse

import msgspec
import uvicorn

from bridge.simulator.engine import SimConfig
from bridge.simulator.server import create_app


class _Probe(msgspec.Struct):
    stream: bool | None = False


_probe = msgspec.json.Decoder(_Probe)


def _streaming(body: bytes) -> bool:
    try:
        return bool(_probe.decode(body).stream)
    except msgspec.DecodeError:
        return True  # not ours to answer: the simulator says what is wrong with it


class InstantFront:
    """An ASGI app: the recorded answer for a non-streaming completion, else the simulator."""

    def __init__(self, simulator) -> None:
        self._simulator = simulator
        self._answer: tuple[dict, dict] | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
            await self._simulator(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        streaming = _streaming(body)
        # a delay asked for is the simulator's to keep (it sleeps, then answers)
        delayed = b"ttft=" in body
        if self._answer is not None and not streaming and not delayed:
            await send(self._answer[0])
            await send(self._answer[1])
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        if streaming or delayed:
            await self._simulator(scope, replay, send)
            return
        sent: list[dict] = []

        async def record(message):
            sent.append(message)
            await send(message)
        await self._simulator(scope, replay, record)
        if sent and sent[0].get("status") == 200:
            whole = b"".join(m.get("body", b"") for m in sent[1:])
            self._answer = (sent[0], {"type": "http.response.body", "body": whole})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instant")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = uvicorn.Config(InstantFront(create_app(SimConfig())), host="127.0.0.1", port=args.port,
                            http="httptools", loop="uvloop", lifespan="off", access_log=False,
                            log_level="warning")
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
