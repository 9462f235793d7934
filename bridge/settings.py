"""The bridge's own settings. `service/config.py` reads them from CODEPLAN_* variables (where each
is documented) and hands them over; the bridge never reads the environment itself."""
from __future__ import annotations

import msgspec


class BridgeSettings(msgspec.Struct, kw_only=True, frozen=True):
    upstream_timeout: float = 600.0  # upstream silence mid-answer before it is taken for dead
    header_wait: float = 3.0  # a stream waits this long for the upstream's status
    keepalive_interval: float = 10.0  # silence before a keep-alive goes to the client
    heartbeat_interval: float = 15.0  # lease renewal of a live request
    reservation_lease: float = 120.0  # a pending entry without heartbeats expires after this
    drain_timeout: float = 120.0  # reading on for usage after the client left mid-stream
    max_drains: int = 256
    max_request_seconds: float = 3600.0  # any request still open after this is settled and closed
    model_aliases: tuple[str, ...] = ()
    claude_model: str = "glm-4.6"
    claude_haiku_model: str = "glm-4.5-air"
    # where users reach the service: billing errors point at {public_url}/billing
    public_url: str = "http://127.0.0.1:8080"
    # the Responses API over WebSockets (Codex's supports_websockets), and how many sockets a
    # process holds at most (0: no limit); a refused upgrade sends Codex to HTTP at once
    responses_websockets: bool = True
    max_websockets: int = 512
    # request bodies nesting deeper than this are refused before decoding (bridge/depth.py)
    max_json_depth: int = 64
