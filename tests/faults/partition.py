"""A database behind a network link that can be cut without a reset: a partition, for real.

The kernel answers for a process that merely stops reading (it acknowledges data and keepalive
probes), so a proxy that stops passing bytes (tests/conftest.py `TcpProxy.freeze`) is a server
that does not answer, not a host that vanished. Here the database is reached over a veth pair
into a network namespace of its own, where this module, run as a program, forwards TCP to the
embedded PostgreSQL's unix socket (the filesystem is shared across namespaces). `cut()` takes
the namespace's end of the link down: from then on every packet the test process sends there is
dropped, silently, as in a partition; `heal()` brings it back. Needs root (`ip netns`); without it
the tests that use it are skipped, saying why.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

PORT = 5432


class Partition:
    def __init__(self, socket_path: str) -> None:
        tag = f"{os.getpid() % 100000}"
        self.namespace = f"cpdb{tag}"
        self._host_end, self._far_end = f"cpa{tag}", f"cpb{tag}"
        subnet = 4 * (os.getpid() % 60)  # a /30 of 10.213.0.0/24, one per test process
        self._host_address, self.address = f"10.213.0.{subnet + 1}", f"10.213.0.{subnet + 2}"
        self._forwarder: subprocess.Popen | None = None
        self._remove()  # left by a run killed before its clean-up, under this process's number
        try:
            self._ip("netns", "add", self.namespace)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"a network namespace cannot be made here (root and `ip netns` needed): {exc}")
        try:
            self._ip("link", "add", self._host_end, "type", "veth", "peer", "name", self._far_end)
            self._ip("link", "set", self._far_end, "netns", self.namespace)
            self._ip("addr", "add", f"{self._host_address}/30", "dev", self._host_end)
            self._ip("link", "set", self._host_end, "up")
            self._inside("addr", "add", f"{self.address}/30", "dev", self._far_end)
            self._inside("link", "set", self._far_end, "up")
            # the far end's address resolved for good: a cut drops packets silently, as past a
            # router, rather than failing its neighbour lookup (a quick "no route to host")
            mac = subprocess.run(["ip", "netns", "exec", self.namespace, "cat", f"/sys/class/net/{self._far_end}/address"],
                                 check=True, capture_output=True, text=True).stdout.strip()
            self._ip("neigh", "replace", self.address, "lladdr", mac, "dev", self._host_end, "nud", "permanent")
            self._forwarder = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, sys.executable, __file__, self.address,
                 str(PORT), socket_path], stdout=subprocess.PIPE)
            assert self._forwarder.stdout is not None
            if self._forwarder.stdout.readline() != b"listening\n":
                raise RuntimeError("the forwarder in the namespace did not start")
        except BaseException:
            self.close()
            raise

    def url(self, database_url: str) -> str:
        name = database_url.partition("?")[0].rsplit("/", 1)[1]
        return f"postgresql://postgres@{self.address}:{PORT}/{name}"

    def cut(self) -> None:
        self._inside("link", "set", self._far_end, "down")

    def heal(self) -> None:
        self._inside("link", "set", self._far_end, "up")
        deadline = time.monotonic() + 10
        while b"state UP" not in subprocess.run(["ip", "link", "show", self._host_end],
                                                capture_output=True).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("the link did not come back up")
            time.sleep(0.05)

    def close(self) -> None:
        if self._forwarder is not None:
            self._forwarder.kill()
            self._forwarder.wait()
        self._remove()

    def _remove(self) -> None:
        subprocess.run(["ip", "link", "del", self._host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def _inside(self, *args: str) -> None:
        self._ip("netns", "exec", self.namespace, "ip", *args)


async def _forward(address: str, port: int, socket_path: str) -> None:
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(socket_path)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(client, address, port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":  # the forwarder, inside the namespace
    asyncio.run(_forward(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
