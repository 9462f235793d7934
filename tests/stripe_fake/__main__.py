"""Run the Stripe fake: `python -m tests.stripe_fake --port 12111 --api-key sk_test_...`."""
from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web

from .server import create_app


async def serve(host: str, port: int, api_keys: tuple[str, ...]) -> None:
    app = create_app(api_keys, f"http://{host}:{port}")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"stripe fake listening on http://{host}:{port}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="stripe-fake")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", action="append", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, tuple(args.api_key)))


if __name__ == "__main__":
    main()
