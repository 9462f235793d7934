"""A database behind a network link that can be cut without a reset: a partition, for real.

The kernel answers for a process that merely stops reading (it acknowledges data and keepalive
probes), so a proxy that stops passing bytes (tests/conftest.py `TcpProxy.freeze`) is a server
that does not answer, not a host that vanished. Here the database is reached over a veth pair
into a network namespace of its own, where this module, run as a program, forwards TCP to the
embedded PostgreSQL's unix socket (the filesystem is shared across namespaces). `cut()` takes
the namespace's end of the link down: from then on every packet the test process sends there is
dropped, silently, as in a partition; `heal()` brings it back. Needs root (`ip netns`); without it
the tests that use it are skipped, saying why. Concurrent runs take distinct names (their pids)
and subnets (picked under a lock); a run killed outright leaves a namespace the next run removes,
and a forwarder that exits with it (its stdin closes).
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import threading
import time

import pytest

PORT = 5432
_PREFIX = "cpdb"
_LOCK = "/tmp/codeplan-test-partition.lock"


def _remove(namespace: str) -> None:
    subprocess.run(["ip", "link", "del", "cpa" + namespace.removeprefix(_PREFIX)], capture_output=True)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _sweep() -> None:
    """Remove what runs killed before their clean-up left: namespaces of processes gone."""
    listed = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    for namespace in (line.split()[0] for line in listed.splitlines() if line.startswith(_PREFIX)):
        try:
            pid = int(namespace.removeprefix(_PREFIX), 16)
            if pid != os.getpid():  # (this process has none yet: one of its number is a leftover)
                os.kill(pid, 0)
                continue
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        _remove(namespace)


def _free_subnet() -> tuple[str, str]:
    """A /30 of 10.213.0.0/16 no interface here uses: (this end's address, the far end's)."""
    used = subprocess.run(["ip", "-4", "-o", "addr", "show"], check=True, capture_output=True, text=True).stdout
    for n in range(0, 65536, 4):
        near = f"10.213.{n // 256}.{n % 256 + 1}"
        if f" {near}/" not in used:
            return near, f"10.213.{n // 256}.{n % 256 + 2}"
    raise RuntimeError("no free subnet in 10.213.0.0/16")


class Partition:
    def __init__(self, socket_path: str) -> None:
        tag = f"{os.getpid():x}"  # this process's: a killed run's leftovers are known by theirs
        self.namespace = f"{_PREFIX}{tag}"
        self._host_end, self._far_end = f"cpa{tag}", f"cpb{tag}"
        self._forwarder: subprocess.Popen | None = None
        try:
            _sweep()
            self._ip("netns", "add", self.namespace)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"a network namespace cannot be made here (root and `ip netns` needed): {exc}")
        try:
            with open(_LOCK, "w") as lock:  # concurrent runs pick their subnets one at a time
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._host_address, self.address = _free_subnet()
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
            # (it exits when its stdin closes: with this process, however that ends)
            self._forwarder = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, sys.executable, __file__, self.address,
                 str(PORT), socket_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
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
        _remove(self.namespace)

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


def _exit_with_stdin() -> None:
    sys.stdin.buffer.read()
    os._exit(0)


if __name__ == "__main__":  # the forwarder, inside the namespace
    threading.Thread(target=_exit_with_stdin, daemon=True).start()
    asyncio.run(_forward(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
