"""A CPU budget for a process tree: a cgroup whose quota is a number of cores.

The workers goal is stated for a machine where the load generator and the upstream have cores
of their own. On a small host (two cores here) a second worker competes with wrk, the upstream
and PostgreSQL, so its figure says more about the host than about the workers. Giving each
server a fixed budget, n workers n times one worker's, keeps the rest of the host for the
others: whether n workers then do n times the work, at the same CPU per request, is what the
design decides. The kernel's CFS quota enforces the budget; a short period keeps a throttled
process from stalling for long (latency under a budget is not the figure, throughput is).

cgroup v1 (a `cpu` hierarchy, as here) and v2 (`cpu.max`) both work; where neither can be
written (not root, a container without delegation) `CpuCap.open` raises `CpuCapUnavailable`
with the reason, and the bench prints it.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PERIOD_US = 10_000
PREFIX = "codeplan-bench-"
_ROOTS = ((Path("/sys/fs/cgroup/cpu"), False), (Path("/sys/fs/cgroup/unified"), True),
          (Path("/sys/fs/cgroup"), True))


class CpuCapUnavailable(Exception):
    pass


class CpuCap:
    def __init__(self, path: Path, v2: bool) -> None:
        self.path = path
        self._v2 = v2

    @classmethod
    def open(cls, name: str, cores: float) -> "CpuCap":
        """A new cgroup `PREFIX + name` limited to `cores` (fractions allowed)."""
        reasons = []
        for root, v2 in _ROOTS:
            try:
                if v2:
                    if "cpu" not in (root / "cgroup.controllers").read_text().split():
                        continue
                    control = root / "cgroup.subtree_control"
                    if "cpu" not in control.read_text().split():
                        control.write_text("+cpu")
                elif not (root / "cpu.cfs_quota_us").exists():
                    continue
                _remove_stale(root)
                path = root / (PREFIX + name)
                path.mkdir(exist_ok=True)
                quota = max(1000, int(PERIOD_US * cores))
                if v2:
                    (path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
                else:
                    (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                    (path / "cpu.cfs_quota_us").write_text(str(quota))
                return cls(path, v2)
            except OSError as exc:
                reasons.append(f"{root}: {exc.strerror or exc}")
        raise CpuCapUnavailable("; ".join(reasons) or "no cpu cgroup controller mounted")

    def enter(self) -> None:
        """Move the calling process into the group (a `preexec_fn`: its children follow)."""
        (self.path / self._members).write_text(str(os.getpid()))

    def throttled(self) -> tuple[int, int]:
        """(periods throttled, periods run) so far: how often the budget was what stopped it."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stat.get("nr_throttled", 0)), int(stat.get("nr_periods", 0))

    def close(self) -> None:
        """Removed, once whatever is left in it (a worker its supervisor left behind) is killed."""
        deadline = time.monotonic() + 2
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    print(f"cgroup {self.path} left behind: it still has processes")
                    return
            for pid in _members(self.path / self._members):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    @property
    def _members(self) -> str:
        return "cgroup.procs" if self._v2 else "tasks"


def _members(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except OSError:
        return []


def _remove_stale(root: Path) -> None:
    """Groups a bench killed before its end left behind, once empty."""
    for stale in root.glob(PREFIX + "*"):
        try:
            stale.rmdir()
        except OSError:
            pass
