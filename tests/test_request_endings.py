"""How a request ends when its client leaves, or its lifetime cap (CODEPLAN_MAX_REQUEST_SECONDS)
comes, before the upstream has answered, or mid-stream.

A hand-made upstream (raw sockets, a thread per connection) notes when the bridge hangs up on it,
so each test can tell whether the upstream was stopped or left working for nobody. The bridges
are real processes; the ledger is real PostgreSQL.

What was wrong (all found by review, each test failed before its mend):
- a non-streamed request never noticed its client leaving (nothing listened for
  `http.disconnect` while the journey waited): the upstream computed on, the answer was billed in
  full though nobody got it, and the upstream slot and the plan's concurrency slot stayed held,
  so a coding tool's retry after its timeout was refused (429 on a plan of one at a time);
- the lifetime cap did not cancel an upstream request that had not answered: a stream capped
  then crashed when the upstream finally answered (an assertion's traceback, a half-written
  HTTP response, no error event) and a whole answer kept waiting past its cap;
- a stream cut by the cap was logged as "upstream died mid-stream" and its client told that the
  model provider's stream broke off.
"""
from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
import uuid

import httpx
import pytest

from bridge.flight import Flight, Flights
from bridge.metering import Calibration
from bridge.ports import Principal, Settlement
from bridge.settings import BridgeSettings

from .conftest import free_port, new_plan, new_user, query, run, start_bridge, wait_settled
from .scripted_upstream import DONE, chunk, usage

LIFETIME_CAP = "lifetime cap reached"  # the reason the ledger records (bridge/flight.py)
CAP = 2  # the capped bridge's CODEPLAN_MAX_REQUEST_SECONDS
SEEN: dict[str, dict] = {}  # tag -> what the upstream saw of that request


# ---- the upstream ------------------------------------------------------------------------------

def _read_request(conn: socket.socket) -> dict:
    data = b""
    while b"\r\n\r\n" not in data:
        got = conn.recv(65536)
        if not got:
            return {}
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return json.loads(body or b"{}") if head.startswith(b"POST") else {}


def _hung_up_within(conn: socket.socket, seconds: float) -> float | None:
    """Wait up to `seconds`; how long until the bridge closed its side, or None."""
    started = time.monotonic()
    end = started + seconds
    while (left := end - time.monotonic()) > 0:
        ready, _, _ = select.select([conn], [], [], left)
        if ready:
            try:
                if conn.recv(1, socket.MSG_PEEK) == b"":
                    return time.monotonic() - started
            except OSError:
                return time.monotonic() - started
            time.sleep(0.05)
    return None


def _whole(content: str, completion: int) -> bytes:
    payload = json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "glm-4.6",
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                       "finish_reason": "stop"}],
                          "usage": usage(50, completion)}).encode()
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(payload)).encode() + b"\r\nconnection: close\r\n\r\n" + payload)


_SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"


def _serve(conn: socket.socket) -> None:
    """`[[tag T]]` names the request in SEEN; `hold` answers nothing for 8 s unless hung up on
    (then a whole answer of 900 tokens, or a stream); `slow_stream` streams a token a second; any
    other request gets a short answer in the shape it asked for."""
    try:
        body = _read_request(conn)
        if not body:
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            return
        text = json.dumps(body.get("messages", []))
        tag = text.split("[[tag ", 1)[1].split("]]", 1)[0] if "[[tag " in text else "none"
        seen = SEEN.setdefault(tag, {})
        seen["arrived"] = time.monotonic()
        streamed = bool(body.get("stream"))
        if "hold" in text:
            gone = _hung_up_within(conn, 8.0)
            seen["hung_up_after"] = gone
            if gone is None:
                conn.sendall(_SSE_HEAD + chunk({"role": "assistant", "content": "late"}, "stop", usage(50, 900))
                             + DONE if streamed else _whole("late", 900))
            return
        if "slow_stream" in text:
            conn.sendall(_SSE_HEAD + chunk({"role": "assistant", "content": "Hello"}))
            for i in range(30):
                if _hung_up_within(conn, 1.0) is not None:
                    seen["hung_up_at"] = i
                    return
                conn.sendall(chunk({"content": f" w{i}"}))
            conn.sendall(chunk({}, "stop", usage(50, 31)) + DONE)
            return
        if streamed:
            conn.sendall(_SSE_HEAD + chunk({"role": "assistant", "content": "hi"}, "stop", usage()) + DONE)
        else:
            conn.sendall(_whole("hi", 7))
    except OSError:
        pass
    finally:
        conn.close()


@pytest.fixture(scope="module")
def upstream():
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    yield f"http://127.0.0.1:{port}/v1"
    listener.close()


@pytest.fixture(scope="module")
def patient(database, upstream):
    """A bridge with the default lifetime cap (an hour)."""
    server = start_bridge(database, upstream, CODEPLAN_UPSTREAM_KEYS="patient-k")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def capped(database, upstream):
    """A bridge whose requests live CAP seconds at most."""
    server = start_bridge(database, upstream, CODEPLAN_UPSTREAM_KEYS="capped-k",
                          CODEPLAN_MAX_REQUEST_SECONDS=str(CAP), CODEPLAN_HEADER_WAIT="0.5",
                          CODEPLAN_KEEPALIVE_INTERVAL="1", CODEPLAN_HEARTBEAT_INTERVAL="1")
    yield server
    server.stop()


def _rows(database: str, key: str) -> list[dict]:
    wait_settled(database)
    return [dict(r) for r in run(query(
        database, "SELECT l.state, l.estimated, l.completion_tokens, l.billed_tokens FROM usage_ledger l"
                  " JOIN api_keys k ON k.id = l.api_key_id WHERE k.prefix = $1", key[:10]))]


def _hung_up(tag: str, within: float = 5.0) -> float | None:
    deadline = time.monotonic() + within
    while "hung_up_after" not in SEEN.get(tag, {}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return SEEN.get(tag, {}).get("hung_up_after")


# where each surface is asked, how, and how its error names the time limit
SURFACES = {
    "chat": ("/v1/chat/completions",
             lambda text, stream: {"model": "glm-4.6", "stream": stream,
                                   "messages": [{"role": "user", "content": text}]},
             '"code":"request_time_limit"'),
    "messages": ("/v1/messages",
                 lambda text, stream: {"model": "glm-4.6", "max_tokens": 200, "stream": stream,
                                       "messages": [{"role": "user", "content": text}]},
                 '"type":"timeout_error"'),
    "responses": ("/v1/responses",
                  lambda text, stream: {"model": "glm-4.6", "stream": stream, "input": text},
                  "response.failed"),
}


# ---- a non-streamed request whose client leaves ------------------------------------------------

def test_a_non_streamed_request_whose_client_leaves_stops_the_upstream_and_is_voided(database, patient):
    """Its client gives up after 1 s, before the upstream answered: the bridge hangs up on the
    upstream at once and voids the entry (README: a request the client leaves before the upstream
    answers is voided). It used to wait for the whole answer and post its 900 tokens."""
    key = new_user(database)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(patient.url + "/v1/chat/completions", timeout=1.0, headers={"authorization": f"Bearer {key}"},
                   json={"model": "glm-4.6", "messages": [{"role": "user", "content": "[[tag leave1]] hold"}]})
    gone = _hung_up("leave1")
    assert gone is not None and gone < 3.0, SEEN.get("leave1")
    assert _rows(database, key) == [{"state": "voided", "estimated": False, "completion_tokens": 0,
                                     "billed_tokens": 0}]


def test_a_retry_after_a_non_streamed_client_timeout_is_not_refused_by_the_abandoned_request(database, patient):
    """On a plan of one request at a time, a coding tool that times out and asks again gets its
    answer: the abandoned request gave its place back when its client left. It used to hold it
    (and the upstream's slot) until the upstream's answer, so the retry got a 429."""
    key = new_user(database, new_plan(database, 10_000_000, max_concurrent=1))
    with pytest.raises(httpx.TimeoutException):
        httpx.post(patient.url + "/v1/chat/completions", timeout=1.0, headers={"authorization": f"Bearer {key}"},
                   json={"model": "glm-4.6", "messages": [{"role": "user", "content": "[[tag leave2]] hold"}]})
    retry = httpx.post(patient.url + "/v1/chat/completions", timeout=10, headers={"authorization": f"Bearer {key}"},
                       json={"model": "glm-4.6", "messages": [{"role": "user", "content": "[[tag leave2b]] hi"}]})
    assert retry.status_code == 200, (retry.status_code, retry.text[:300])
    assert retry.json()["choices"][0]["message"]["content"] == "hi"


# ---- the lifetime cap before the upstream answered ---------------------------------------------

@pytest.mark.parametrize("surface", ["chat", "messages", "responses"])
def test_a_stream_capped_before_the_upstream_answered_ends_with_the_time_limit_error(database, capped, surface):
    """The upstream has sent nothing when the cap comes: the bridge hangs up on it, voids the
    entry and ends the stream with its protocol's error saying the time limit was reached. It used
    to leave the upstream working, then, at its late answer, fail an assertion (a traceback in the
    log) and cut the HTTP response mid-chunk with no error event."""
    path, body, marker = SURFACES[surface]
    key = new_user(database)
    tag = f"cap-stream-{surface}"
    started = time.monotonic()
    with httpx.stream("POST", capped.url + path, timeout=30, headers={"authorization": f"Bearer {key}"},
                      json=body(f"[[tag {tag}]] hold", True)) as response:
        assert response.status_code == 200
        text = "\n".join(response.iter_lines())  # a cut response would raise here
    took = time.monotonic() - started
    assert "Request time limit reached" in text and marker in text, text[-600:]
    assert took < CAP + 2, took
    gone = _hung_up(tag)
    assert gone is not None and gone < CAP + 1.5, SEEN.get(tag)
    assert _rows(database, key)[0]["state"] == "voided"
    log = capped.output()
    assert "Traceback" not in log and "upstream died mid-stream" not in log, log[-2000:]


@pytest.mark.parametrize("surface", ["chat", "messages"])
def test_a_whole_answer_capped_before_the_upstream_answered_is_the_time_limit_error(database, capped, surface):
    """A non-streamed request at its cap gets a 504 in its protocol's shape at once, and the
    upstream is hung up on; it used to wait for the upstream's answer past its cap."""
    path, body, marker = SURFACES[surface]
    key = new_user(database)
    tag = f"cap-whole-{surface}"
    started = time.monotonic()
    answer = httpx.post(capped.url + path, timeout=30, headers={"authorization": f"Bearer {key}"},
                        json=body(f"[[tag {tag}]] hold", False))
    took = time.monotonic() - started
    assert answer.status_code == 504, (answer.status_code, answer.text[:300])
    assert "Request time limit reached" in answer.text and marker in answer.text, answer.text
    assert took < CAP + 2, took
    gone = _hung_up(tag)
    assert gone is not None and gone < CAP + 1.5, SEEN.get(tag)
    assert _rows(database, key)[0]["state"] == "voided"


# ---- the lifetime cap mid-stream ---------------------------------------------------------------

def test_the_lifetime_cap_mid_stream_is_told_as_the_time_limit_not_as_the_upstream_dying(database, capped):
    """A stream still running at its cap ends with the time-limit error; neither the log nor the
    client says the upstream died (they used to: "upstream died mid-stream", "The model provider's
    stream broke off"). It is billed as a request cut short: the prompt estimate and what was
    delivered, estimated, never the whole answer."""
    key = new_user(database)
    with httpx.stream("POST", capped.url + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": "glm-4.6", "stream": True,
                            "messages": [{"role": "user", "content": "[[tag cap-mid]] slow_stream"}]}) as response:
        request_id = response.headers["x-request-id"]
        lines = list(response.iter_lines())
    text = "\n".join(lines)
    assert " w0" in text, text  # it was mid-stream
    assert "Request time limit reached" in text and '"code":"request_time_limit"' in text, lines[-3:]
    assert "broke off" not in text and '"finish_reason":"stop"' not in text, lines[-3:]
    rows = _rows(database, key)
    assert rows[0]["state"] == "posted" and rows[0]["estimated"], rows
    mine = [line for line in capped.output().splitlines() if request_id in line]
    assert any("lifetime cap" in line for line in mine), mine
    assert not any("upstream died mid-stream" in line for line in mine), mine


# ---- the flight owns its upstream request ------------------------------------------------------

class _Ledger:
    def __init__(self) -> None:
        self.settled: list[Settlement] = []

    async def heartbeat(self, entry_id: uuid.UUID, delivered_tokens: int) -> bool:
        return True

    def settle(self, settlement: Settlement) -> "asyncio.Future[int | None]":
        self.settled.append(settlement)
        written = asyncio.get_running_loop().create_future()
        written.set_result(0)
        return written


class _Response:
    closed = False

    def close(self) -> None:
        self.closed = True

    def end(self) -> None:
        self.closed = True


def _flight(settings: BridgeSettings) -> tuple[Flights, Flight, _Ledger]:
    ledger = _Ledger()
    flights = Flights(settings, ledger, Calibration(), "test")
    flight = Flight(flights, entry=uuid.uuid4(), principal=Principal(account_id=1, api_key_id=1, subscription_id=1,
                                                                     plan_id="p", models=()),
                    surface="chat", model="glm-4.6", shown_model="glm-4.6", prompt_estimate=10, raw_prompt=10,
                    kind="ascii", started=time.monotonic())
    return flights, flight, ledger


async def test_the_lifetime_cap_cancels_the_upstream_request_still_on_its_way():
    """The flight's end, here at its cap, stops the upstream request it owns (the one owner of an
    admitted request: nobody else has to remember to); the entry is voided, the cause kept."""
    flights, flight, ledger = _flight(BridgeSettings(heartbeat_interval=5, max_request_seconds=0.2))
    opening = asyncio.ensure_future(asyncio.sleep(30))
    flight.attach(opening)
    await asyncio.sleep(0.4)
    await flights.land()
    assert flight.ended and flight.cause == LIFETIME_CAP
    assert opening.cancelled()
    assert [(s.state, s.reason) for s in ledger.settled] == [("voided", LIFETIME_CAP)]


async def test_a_response_that_arrives_after_the_flight_ended_is_closed():
    flights, flight, ledger = _flight(BridgeSettings(heartbeat_interval=5, max_request_seconds=60))
    opening = asyncio.get_running_loop().create_future()
    flight.attach(opening)
    response = _Response()
    opening.set_result(response)  # answered, but not heard yet
    flight.end("client left before the upstream answered")
    await asyncio.sleep(0)
    await flights.land()
    assert response.closed and flight.response is None
    assert [s.state for s in ledger.settled] == ["voided"]
