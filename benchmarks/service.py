"""The query service under load: ``python -m benchmarks.service [--quick] [--out DIR]``.

A synthetic index (random ReLU features written with ``tasks.features.store``, a matching
catalog whose images are a few generated files) per input size; ``image-search serve`` on it as
a real process; then, from this process over HTTP on 127.0.0.1:

- latency of one query at a time (p50/p99 over ``--requests``, after warm-up), with the
  server's own split into decode, embed and search;
- throughput with ``--clients`` concurrent clients, with the search batched (``--max-batch``)
  and, for comparison in the same run, without (``--max-batch 1``);
- the service's memory (RSS after loading, peak after the run);
- the command line's cold start (``image-search query``: imports, model, index load, one query).

Writes ``service.json`` and ``service.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
SEALED = {**harness.SEALED, "TF_CPP_MIN_LOG_LEVEL": "2"}


def write_image(path: Path, side: int, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def synthetic_index(folder: Path, n: int, input_size: int) -> Path:
    """An index folder of ``n`` random (n, 2048) ReLU features with the metadata a run with
    random weights at ``input_size`` writes, a catalog pointing at 16 generated images, and
    what a run writes for queries (the memory-mapped copy, the exported model)."""
    from benchmarks.startup import write_index
    from tasks.types import ModelSpec

    key = ModelSpec("none", 0, "float32", input_size).key()
    return write_index(folder, n, input_size, key, for_queries=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak (VmRSS, VmHWM), MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


class Served:
    """``image-search serve`` on a free port, started and waited for."""

    def __init__(self, index: Path, *extra: str) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *("-m", "flows.cli", "serve", "--index", str(index), "--port", str(self.port)),
                *("--max-concurrency", "64", *extra),
            ],
            cwd=REPO,
            env={**os.environ, **SEALED},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        with httpx.Client(trust_env=False) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
                try:
                    if client.get(self.url + "/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
        self.ready_s = time.perf_counter() - started

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def sequential(url: str, image: bytes, n: int, warmup: int = 10) -> dict[str, Any]:
    """One client, one request at a time: latency percentiles and the server's own split."""
    import httpx

    latencies, server = [], []
    with httpx.Client(base_url=url, trust_env=False, timeout=120) as client:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            resp = client.post("/search?k=10", files={"image": ("q.png", image)})
            dt = time.perf_counter() - t0
            resp.raise_for_status()
            if i >= warmup:
                latencies.append(dt * 1e3)
                server.append(resp.json()["timings_ms"])
    arr = np.array(latencies)
    return {
        "requests": n,
        "p50_ms": round(float(np.percentile(arr, 50)), 1),
        "p99_ms": round(float(np.percentile(arr, 99)), 1),
        "mean_ms": round(float(arr.mean()), 1),
        **{
            f"server_{part}_p50_ms": round(statistics.median(t[part] for t in server), 1)
            for part in ("decode", "embed", "search", "total")
        },
    }


def concurrent(url: str, image: bytes, clients: int, per_client: int) -> dict[str, Any]:
    """``clients`` threads, each sending ``per_client`` requests back to back."""
    import httpx

    latencies: list[float] = []
    batches: list[int] = []
    lock = threading.Lock()
    errors: list[str] = []

    def worker() -> None:
        with httpx.Client(base_url=url, trust_env=False, timeout=300) as client:
            for _ in range(per_client):
                t0 = time.perf_counter()
                resp = client.post("/search?k=10", files={"image": ("q.png", image)})
                dt = time.perf_counter() - t0
                with lock:
                    if resp.status_code != 200:
                        errors.append(f"{resp.status_code} {resp.text[:100]}")
                        continue
                    latencies.append(dt * 1e3)
                    batches.append(resp.json()["batch"])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    arr = np.array(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[:3],
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(arr, 50)), 1),
        "p99_ms": round(float(np.percentile(arr, 99)), 1),
        "mean_batch": round(float(np.mean(batches)), 2),
    }


COLD = """
import json, time, sys
t0 = time.perf_counter()
import numpy as np
from tasks.ask import ask, load_forward, model_spec, open_index, query_sources
t1 = time.perf_counter()
index = open_index(sys.argv[1])
t2 = time.perf_counter()
forward = load_forward(model_spec(index.meta), index.model_file)
t3 = time.perf_counter()
ask(index, forward, query_sources([sys.argv[2]]), 10)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "index_load_s": t2 - t1, "model_s": t3 - t2,
                  "first_query_s": t4 - t3}))
"""


def cold_start(index: Path, image: Path, repeats: int) -> dict[str, Any]:
    """The command line from nothing to its answer, and the same split into phases."""
    walls, phases = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "query", str(image), "--index", str(index)],
            cwd=REPO,
            env={**os.environ, **SEALED},
            check=True,
            capture_output=True,
        )
        walls.append(time.perf_counter() - t0)
        done = subprocess.run(
            [sys.executable, "-c", COLD, str(index), str(image)],
            cwd=REPO,
            env={**os.environ, **SEALED},
            check=True,
            capture_output=True,
            text=True,
        )
        phases.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        "repeats": repeats,
        "cli_wall_s": round(statistics.median(walls), 2),
        **{k: round(statistics.median(p[k] for p in phases), 2) for k in phases[0]},
    }


def encode(side: int, seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def run(n: int, requests: int, clients: int, sizes: list[int], repeats: int) -> dict[str, Any]:
    from tasks.hardware import cpu_count, cpu_features

    cpu = cpu_features()
    results: dict[str, Any] = {
        "machine": {
            "cpu": cpu.model,
            "cores": cpu_count(),
            "flags": sorted(f for f, on in cpu.summary().items() if on),
            "python": sys.version.split()[0],
        },
        "n_index": n,
        "clients": clients,
        "load_before": os.getloadavg(),
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        base = Path(tmp)
        for size in sizes:
            index = synthetic_index(base / f"index{size}", n, size)
            image = encode(size, 7)
            per_client = max(1, requests // clients)
            row: dict[str, Any] = {"index_bytes_mib": round(n * 2048 * 4 / 2**20, 1)}
            served = Served(index)
            try:
                row["ready_s"] = round(served.ready_s, 1)
                row["rss_after_load_mib"] = rss_mib(served.proc.pid)["VmRSS"]
                row["sequential"] = sequential(served.url, image, requests)
                row["concurrent"] = concurrent(served.url, image, clients, per_client)
                row["rss_peak_mib"] = rss_mib(served.proc.pid)["VmHWM"]
            finally:
                served.stop()
            if size == sizes[0]:
                unbatched = Served(index, "--max-batch", "1")
                try:
                    row["concurrent_unbatched"] = concurrent(
                        unbatched.url, image, clients, per_client
                    )
                finally:
                    unbatched.stop()
                query = base / "query.png"
                query.write_bytes(image)
                row["cold_start"] = cold_start(index, query, repeats)
            results["sizes"][str(size)] = row
            print(json.dumps({size: row}, indent=1), flush=True)
    results["load_after"] = os.getloadavg()
    return results


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Index: {results['n_index']:,} images × 2048 float32; CPU {m['cpu']}, {m['cores']} cores; "
        f"flags {', '.join(m['flags'])}; load average before {results['load_before'][0]:.2f}, "
        f"after {results['load_after'][0]:.2f}.",
        "",
        "| input | p50 ms | p99 ms | server embed / search ms (p50) | ready s "
        f"| RSS loaded / peak MiB | {results['clients']} clients req/s (batched) "
        "| req/s (max-batch 1) | mean batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, row in results["sizes"].items():
        s, c = row["sequential"], row["concurrent"]
        u = row.get("concurrent_unbatched", {})
        lines.append(
            f"| {size} | {s['p50_ms']} | {s['p99_ms']} | {s['server_embed_p50_ms']} / "
            f"{s['server_search_p50_ms']} | {row['ready_s']} | {row['rss_after_load_mib']} / "
            f"{row['rss_peak_mib']} | {c['requests_per_s']} | {u.get('requests_per_s', '–')} "
            f"| {c['mean_batch']} |"
        )
    for size, row in results["sizes"].items():
        if "cold_start" in row:
            cs = row["cold_start"]
            lines += [
                "",
                f"CLI cold start (input {size}, median of {cs['repeats']}): "
                f"`image-search query` {cs['cli_wall_s']} s wall; imports {cs['import_s']} s, "
                f"index load {cs['index_load_s']} s, model load {cs['model_s']} s, first "
                f"query {cs['first_query_s']} s.",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness")
    parser.add_argument("--n", type=int, default=100_000, help="index images")
    parser.add_argument("--requests", type=int, default=240, help="sequential requests")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--sizes", default="96,224", help="input sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="cold starts measured")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args()
    if args.quick:
        args.n, args.requests, args.clients, args.sizes, args.repeats = 2000, 16, 4, "96", 1
    results = run(
        args.n, args.requests, args.clients, [int(s) for s in args.sizes.split(",")], args.repeats
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / "service.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
