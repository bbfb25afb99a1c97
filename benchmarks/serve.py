"""``minitrain serve`` on loopback: images/s and p50/p99 latency at 1, 8 and 32 concurrent
clients, against the same model called in this process at the same batch sizes, and against the
server with batching off (``--max-batch 1 --batch-timeout 0``). Each setting is bounded by a
number of requests and a time. From the server's own /metrics it says where a request's time
goes: in the queue waiting for its batch, in the model, in the rest of the server (HTTP parsing,
decoding the PNG, JSON), and outside the server (the client and the loopback).

    python benchmarks/serve.py runs/a/model-last.onnx [--requests 400] [--seconds 20]

The clients are threads of this process, each with one kept-alive connection, posting the same
32×32 PNG; on a 2-core machine they share the CPU with the server, as the load average printed
with the figures says."""

from __future__ import annotations

import argparse
import http.client
import io
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from minitrain.commands.serve.model import load

CLIENTS = (1, 8, 32)


def png(size: list[int]) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def in_process(model: Path, requests: int, seconds: float) -> list[tuple]:
    served = load(model)
    height, width = served.metadata["input_size"]
    pixels = np.random.default_rng(0).integers(0, 256, (max(CLIENTS), height, width, 3), dtype=np.uint8)
    rows = []
    for batch in CLIENTS:
        served.probabilities(pixels[:batch])  # warm
        times, started = [], time.perf_counter()
        while len(times) * batch < requests and time.perf_counter() - started < seconds:
            begin = time.perf_counter()
            served.probabilities(pixels[:batch])
            times.append(time.perf_counter() - begin)
        rows.append(("in process", batch, len(times) * batch / sum(times), *np.percentile(times, [50, 99]) * 1e3))
    return rows


class Server:
    def __init__(self, model: Path, extra: list[str]):
        command = [sys.executable, "-m", "minitrain", "serve", str(model), "--port", "0", *extra]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r" at http://[^:]+:(\d+)/", line)
        assert found, f"the server did not start: {line}"
        self.port = int(found.group(1))
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def metrics(self) -> dict[str, float]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def load_test(server: Server, body: bytes, clients: int, requests: int, seconds: float) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(n: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for _ in range(n):
            if time.perf_counter() > stop_at:
                break
            begin = time.perf_counter()
            connection.request("POST", "/predict", body, {"Content-Type": "image/png"})
            answer = connection.getresponse()
            answer.read()
            assert answer.status == 200, answer.status
            with lock:
                latencies.append(time.perf_counter() - begin)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [requests // clients] * clients))
    return time.perf_counter() - started, latencies


def through_server(model: Path, name: str, extra: list[str], requests: int, seconds: float) -> list[tuple]:
    server = Server(model, extra)
    body = png(load(model).metadata["input_size"])
    rows = []
    try:
        load_test(server, body, 4, 40, seconds)  # warm
        for clients in CLIENTS:
            before = server.metrics()
            elapsed, latencies = load_test(server, body, clients, requests, seconds)
            after = server.metrics()
            where = {
                "batch": _mean(before, after, "minitrain_batch_size"),
                "queue": _mean(before, after, "minitrain_queue_seconds") * 1e3,
                "model": _mean(before, after, "minitrain_model_seconds") * 1e3,
                "server": _mean(before, after, "minitrain_request_seconds") * 1e3,
            }
            p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
            rows.append((name, clients, len(latencies) / elapsed, p50, p99, where, float(np.mean(latencies)) * 1e3))
    finally:
        server.stop()
    return rows


def _mean(before: dict[str, float], after: dict[str, float], histogram: str) -> float:
    """The mean of a histogram's observations between two scrapes."""
    count = after[f"{histogram}_count"] - before[f"{histogram}_count"]
    return (after[f"{histogram}_sum"] - before[f"{histogram}_sum"]) / max(count, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a file `minitrain export` wrote (.onnx: ONNX Runtime)")
    parser.add_argument("--requests", type=int, default=400, help="requests (images) per setting, at most")
    parser.add_argument("--seconds", type=float, default=20, help="time per setting, at most")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    rows = in_process(args.model, args.requests, args.seconds)
    rows += through_server(args.model, "server, batching what queued (default)", [], args.requests, args.seconds)
    rows += through_server(
        args.model, "server, batching, 5 ms wait", ["--batch-timeout", "5"], args.requests, args.seconds
    )
    rows += through_server(
        args.model, "server, no batching", ["--max-batch", "1", "--batch-timeout", "0"], args.requests, args.seconds
    )
    print("\n| setting | clients (batch) | images/s | p50 ms | p99 ms | mean batch | queue ms | model ms | "
          "rest of server ms | client+loopback ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        name, clients, rate, p50, p99 = row[:5]
        if len(row) == 5:
            print(f"| {name} | {clients} | {rate:.0f} | {p50:.2f} | {p99:.2f} | {clients} | | | | |")
            continue
        where, client_mean = row[5], row[6]
        rest = where["server"] - where["queue"] - where["model"]
        print(
            f"| {name} | {clients} | {rate:.0f} | {p50:.2f} | {p99:.2f} | {where['batch']:.1f} | {where['queue']:.2f} "
            f"| {where['model']:.2f} | {rest:.2f} | {client_mean - where['server']:.2f} |"
        )
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
