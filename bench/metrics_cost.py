"""What the Prometheus metrics cost a request: the calls one served stream makes
(request, usage, settled, stream open and close), timed in a loop, with prometheus_client in
its single-process mode and in the multi-process mode `--workers N` uses, against NoMetrics.

    python -m bench.metrics_cost
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

N = 200_000


def measure() -> float:
    from bridge.metrics import NoMetrics
    from service.metrics import PrometheusMetrics

    results = {}
    for name, metrics in (("none", NoMetrics()), ("prometheus", PrometheusMetrics())):
        started = time.perf_counter()
        for i in range(N):
            metrics.stream(1)
            metrics.stream(-1)
            metrics.request("chat", "glm-4.6", 200, 0.0012, 0.08)
            metrics.settled(0.002)
            metrics.usage("glm-4.6", 1200, 800, 300, 1660)
        results[name] = (time.perf_counter() - started) / N * 1e6
    return results["prometheus"] - results["none"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(f"{measure():.2f}")
        return
    single = subprocess.run([sys.executable, "-m", "bench.metrics_cost", "--child"], capture_output=True,
                            text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as folder:
        multi = subprocess.run([sys.executable, "-m", "bench.metrics_cost", "--child"], capture_output=True,
                               text=True, check=True,
                               env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": folder}).stdout.strip()
    print(f"metrics per served stream: {single} us (one process), {multi} us (multi-process mode, --workers)")


if __name__ == "__main__":
    main()
