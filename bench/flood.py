"""Memory under a flood of unauthenticated big bodies, and /healthz while it lasts.

Starts `codeplan run` (embedded PostgreSQL, built-in simulator) from a source tree, then sends
rounds of concurrent POSTs with big bodies and made-up keys, and reports the server's RSS
(sampled every 20 ms) and the latency of /healthz polled during the flood.

    python -m bench.flood [--code DIR] [--clients 8] [--mb 60] [--rounds 3] [--valid-key] [--path P]
                          [--prompt]

`--prompt` sends well-formed requests whose one message is that many MB of source-like text
(decoded, guarded and counted, then refused as past the context window) instead of a bare run of
bytes that fails to decode.

`--code` runs another checkout (e.g. `git archive <commit> | tar -x -C DIR`) for a before/after.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_body(size: int) -> bytes:
    """A well-formed request of about `size` bytes: one message of varied, code-like text, new
    each time (a resent text's count is cached)."""
    line = "    total += compute(item, index={}) if item else fallback(index)  # step {}\n"
    text, n = [f"# {secrets.token_hex(8)}\n"], 0
    while n < size - 200:
        piece = line.format(len(text), len(text) * 7 % 1000)
        text.append(piece)
        n += len(piece)
    return json.dumps({"model": "glm-4.6", "max_tokens": 16, "messages": [
        {"role": "user", "content": "".join(text)}]}).encode()


def _post(port: int, path: str, size: int, results: list[str], key: str | None, body: bytes | None = None) -> None:
    key = key or f"cp_{secrets.token_urlsafe(30)}"
    if body is not None:
        body = prompt_body(size)
        size = len(body)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {key}\r\nContent-Length: {size}\r\n\r\n").encode()
    chunk = b'{"model": "glm-4.6", "messages": [{"role": "user", "content": "' + b"a" * (1 << 20)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            sock.sendall(head)
            sent = 0
            try:
                if body is not None:
                    sock.sendall(body)
                    sent = size
                while sent < size:
                    piece = chunk[:min(len(chunk), size - sent)]
                    sock.sendall(piece)
                    sent += len(piece)
            except OSError:
                pass  # refused before the body was all sent
            answer = sock.recv(200)
            results.append(answer.split(b"\r\n", 1)[0].decode(errors="replace"))
    except OSError as exc:
        results.append(type(exc).__name__)


def run(code: Path, clients: int, megabytes: int, rounds: int, valid_key: bool = False,
        paths: tuple[str, ...] = ("/v1/messages", "/v1/chat/completions"),
        prompt: bool = False) -> dict[str, float | str]:
    body = b"" if prompt else None  # made anew for each request
    folder = tempfile.mkdtemp(prefix="codeplan-flood-")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEPLAN_")}
    env.update(CODEPLAN_DATA_DIR=folder, CODEPLAN_PORT=str(port), CODEPLAN_LOG_LEVEL="warning",
               PYTHONPATH=str(code))
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "run"], cwd=code, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        key = None
        if valid_key:  # an account of our own: its bodies are read
            made = subprocess.run([sys.executable, "-m", "service.cli", "users", "create", "--email",
                                   "flood@example.com", "--plan", "pro"], cwd=code, env=env,
                                  capture_output=True, text=True, check=True)
            key = made.stdout.strip().splitlines()[-1]
        process = psutil.Process(server.pid)
        time.sleep(1)
        idle = process.memory_info().rss
        peak = [idle]
        latencies: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.02)

        def poll() -> None:
            while not done.is_set():
                started = time.perf_counter()
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30).read()
                    latencies.append(time.perf_counter() - started)
                except OSError:
                    latencies.append(30.0)
                time.sleep(0.05)

        watchers = [threading.Thread(target=sample), threading.Thread(target=poll)]
        for thread in watchers:
            thread.start()
        results: list[str] = []
        started = time.monotonic()
        for _ in range(rounds):
            senders = [threading.Thread(target=_post, args=(port, path, megabytes << 20, results, key, body))
                       for path in (list(paths) * clients)[:clients]]
            for thread in senders:
                thread.start()
            for thread in senders:
                thread.join()
        elapsed = time.monotonic() - started
        done.set()
        for thread in watchers:
            thread.join()
        time.sleep(1)
        after = process.memory_info().rss
        latencies.sort()
        answers = {a: results.count(a) for a in set(results)}
        return {
            "idle RSS MB": idle / 2**20, "peak RSS MB": peak[0] / 2**20, "RSS MB after": after / 2**20,
            "flood seconds": elapsed,
            "healthz p50 ms": statistics.median(latencies) * 1e3 if latencies else float("nan"),
            "healthz p99 ms": latencies[int(len(latencies) * 0.99)] * 1e3 if latencies else float("nan"),
            "answers": ", ".join(f"{n}x {a}" for a, n in sorted(answers.items())),
        }
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--code", type=Path, default=ROOT)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mb", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--valid-key", action="store_true", help="send a real account's key")
    parser.add_argument("--path", action="append", help="paths to post to, in turn")
    parser.add_argument("--prompt", action="store_true", help="well-formed requests with a huge prompt")
    args = parser.parse_args()
    paths = tuple(args.path or ("/v1/messages", "/v1/chat/completions"))
    figures = run(args.code.resolve(), args.clients, args.mb, args.rounds, args.valid_key, paths, args.prompt)
    print(f"{args.clients} clients x {args.rounds} rounds, {args.mb} MB {'prompts' if args.prompt else 'bodies'} to {', '.join(paths)}, "
          f"{'a valid key' if args.valid_key else 'made-up keys'}, code: {args.code}")
    for name, value in figures.items():
        print(f"  {name:16s} {value:,.1f}" if isinstance(value, float) else f"  {name:16s} {value}")


if __name__ == "__main__":
    main()
