"""A streaming request on one of the three surfaces, on its own thread, recording what came back."""
from __future__ import annotations

import json
import threading
import time
import uuid

import httpx


def _request(surface: str, directive: str) -> tuple[str, dict]:
    text = f"[[sim {directive} reasoning=0]] fault {uuid.uuid4().hex[:8]}"
    if surface == "chat":
        return "/v1/chat/completions", {"model": "glm-4.6", "stream": True,
                                        "messages": [{"role": "user", "content": text}]}
    if surface == "messages":
        return "/v1/messages", {"model": "glm-4.6", "stream": True, "max_tokens": 2000,
                                "messages": [{"role": "user", "content": text}]}
    return "/v1/responses", {"model": "glm-4.6", "stream": True, "input": text}


def _usage(surface: str, event: dict, usage: tuple[int, int] | None) -> tuple[int, int] | None:
    """(prompt, completion) so far, from each protocol's usage events."""
    if surface == "chat" and event.get("usage"):
        return event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"]
    if surface == "messages" and event.get("type") == "message_start":
        return event["message"]["usage"]["input_tokens"], 0
    if surface == "messages" and event.get("type") == "message_delta":
        prompt = event["usage"].get("input_tokens") or (usage or (0, 0))[0]
        return prompt, event["usage"]["output_tokens"]
    if surface == "responses" and event.get("type") == "response.completed":
        return event["response"]["usage"]["input_tokens"], event["response"]["usage"]["output_tokens"]
    return usage


class Stream(threading.Thread):
    def __init__(self, url: str, key: str, surface: str, directive: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.surface = url, key, surface
        self.path, self.body = _request(surface, directive)
        self.events = 0
        self.usage: tuple[int, int] | None = None
        self.finished = False
        self.status: int | None = None
        self.error: dict | None = None  # the body of a refusal
        self.started = self.answered = 0.0  # monotonic: sent, status line received

    def run(self) -> None:
        headers = {"authorization": f"Bearer {self.key}", "x-api-key": self.key,
                   "anthropic-version": "2023-06-01"}
        self.started = time.monotonic()
        try:
            with httpx.stream("POST", self.url + self.path, json=self.body, headers=headers, timeout=30) as r:
                self.status, self.answered = r.status_code, time.monotonic()
                if r.status_code != 200:
                    self.error = json.loads(r.read())
                    return
                for line in r.iter_lines():
                    if not line.startswith("data:") or line == "data: [DONE]":
                        self.finished |= line == "data: [DONE]"
                        continue
                    event = json.loads(line[5:])
                    self.events += 1
                    self.usage = _usage(self.surface, event, self.usage)
                    if event.get("type") in ("message_stop", "response.completed"):
                        self.finished = True
        except httpx.HTTPError:
            pass  # the bridge died under it
