"""A scripted OpenAI-style upstream for end-to-end tests (not a test module): stream shapes the
simulator does not produce, as vLLM, SGLang and other OpenAI-compatible hosts send them
(glm-upstream.md §16: operators may forward to them).

A request picks its answer with a `[[script NAME]]` marker anywhere in its messages; without
one it gets a short clean answer. Each answer is the list of raw SSE pieces in `SCRIPTS`,
written and flushed one by one, then the connection is closed, as those servers do."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .conftest import free_port

DONE = b"data: [DONE]\n\n"


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None, *,
          choices: bool = True) -> bytes:
    """One `data:` line of an OpenAI chat-completion-chunk stream."""
    body: dict = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1,
                  "model": "glm-4.6", "choices": []}
    if choices:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def usage(prompt: int = 50, completion: int = 7, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def call(index: int, id: str, name: str, arguments: str) -> dict:
    return {"tool_calls": [{"index": index, "id": id, "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}


# vLLM's mid-generation failure (vllm/entrypoints/openai/serving_chat.py,
# chat_completion_stream_generator): an error object in place of a chunk, then [DONE]
VLLM_ERROR = (b'data: {"error": {"object": "error", "message": "CUDA out of memory", '
              b'"type": "InternalServerError", "param": null, "code": 500}}\n\n')

# name -> the raw SSE pieces of the answer
SCRIPTS: dict[str, list[bytes]] = {
    "vllm_error": [
        chunk({"role": "assistant", "content": "Here is the first half of the ans"}),
        VLLM_ERROR,
        DONE,
    ],
    # the same, with usage on the error's way (include_usage asked): it is what the upstream did
    "vllm_error_with_usage": [
        chunk({"role": "assistant", "content": "Here is the first half of the ans"}),
        VLLM_ERROR,
        chunk(usage=usage(40, 9), choices=False),
        DONE,
    ],
    # an answer, then [DONE] with no finish reason ever given (a host or proxy that lost the end)
    "done_without_finish": [
        chunk({"role": "assistant", "content": "Here is the first half of the ans"}),
        DONE,
    ],
    # a thinking model that thought and then wrote nothing
    "reasoning_only": [
        chunk({"role": "assistant", "reasoning_content": "Let me think about this. "}),
        chunk({"reasoning_content": "I have nothing to add."}),
        chunk({"content": ""}, "stop", usage(30, 12)),
        DONE,
    ],
    # parallel calls sent whole, each at index 0 under its own id (LiteLLM's ollama_chat,
    # Gemini adapters)
    "parallel_index_zero": [
        chunk({"role": "assistant", **call(0, "call_A", "read_file", '{"path": "a.py"}')}),
        chunk(call(0, "call_B", "read_file", '{"path": "b.py"}')),
        chunk({}, "tool_calls", usage(60, 20)),
        DONE,
    ],
    # counts no ledger can take: one negative, some past int4
    "wild_usage": [
        chunk({"role": "assistant", "content": "Hello there."}),
        chunk({}, "stop", {"prompt_tokens": 2**40, "completion_tokens": -5, "total_tokens": 2**40 - 5,
                           "prompt_tokens_details": {"cached_tokens": 2**33}}),
        DONE,
    ],
}

REQUESTS: list[dict] = []  # every request body, in arrival order


def _default() -> list[bytes]:
    return [chunk({"role": "assistant", "content": "hi"}, "stop", usage()), DONE]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the test output is for the tests
        pass

    def do_GET(self) -> None:  # readiness probes, model lists
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        REQUESTS.append(body)
        text = json.dumps(body.get("messages", []))
        name = next((n for n in SCRIPTS if f"[[script {n}]]" in text), None)
        pieces = SCRIPTS[name] if name is not None else _default()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        for piece in pieces:
            self.wfile.write(piece)
            self.wfile.flush()
        self.close_connection = True


def start_scripted() -> tuple[ThreadingHTTPServer, str]:
    """The upstream on a free local port, serving on a daemon thread, and its base URL."""
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}/v1"
