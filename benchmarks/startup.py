"""How fast every command starts, this code beside an earlier one:
``python -m benchmarks.startup --before DIR [--n 100000] [--repeats 5] [--out DIR] [CASE ...]``.

``--before DIR``: a copy of the code to compare with (``git archive REV | tar -x -C DIR``), run
by this interpreter from that folder. Each repeat runs the earlier code, then this code
(interleaved, so that the load of a shared machine falls on both); medians are reported.

Cases:

- ``help``: ``image-search --help`` and ``image-search query --help``;
- ``query``: ``image-search query IMAGE --index INDEX`` from a new process to its answer, at 42
  and ``--n`` images (synthetic random ReLU features, a catalog of generated images; this
  code's index also holds what a run writes for queries: the memory-mapped copy, the exported
  model), and this code's phases (imports, index open, model load, first query);
- ``serve``: ``image-search serve`` from start until ``/healthz`` answers, and its resident
  memory then and after the first search (which maps every page of the index);
- ``rerun``: the quick start run again with nothing changed (``run --source sample --weights
  none``) without ``PREFECT_API_URL``: the earlier code starts a temporary Prefect API per run,
  this one finds the shared local API running (its first run, which starts it, is not timed);
- ``fresh``: the same command on a fresh ``PREFECT_HOME`` (the API creates its database);
- ``engines``: the batch path's forward pass (TensorFlow) beside the exported model's
  (onnxruntime) on batches of 128 random images at 96 and 224 pixels, and how far apart their
  embeddings are (this code only).

Writes ``startup.json`` and ``startup.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
SEALED = harness.SEALED
CASES = ("help", "query", "serve", "rerun", "fresh", "engines")


def _env(code: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TF_CPP"))}
    env.update(SEALED)
    env["PYTHONPATH"] = str(code)  # the code under test, before the installed one
    env.update(extra)
    return env


def _cli(*args: str) -> list[str]:
    """The command line, as ``python -m flows.cli``: run from a version's folder, that
    version's."""
    return [sys.executable, "-m", "flows.cli", *args]


def model_key(code: Path, input_size: int) -> str:
    """The model key of random weights at ``input_size`` as the code in ``code`` computes it
    (it hashes its own model code, so the two versions differ)."""
    script = (
        "from tasks.types import ModelSpec\n"
        f"print(ModelSpec('none', 0, 'float32', {input_size}).key())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=code,
        env=_env(code),
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def catalog_images(images: Path, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """16 generated 96-px PNGs in ``images`` (created), drawn from ``rng``, for a synthetic
    index's catalog rows to point at: their paths and SHA-256 digests."""
    from PIL import Image

    images.mkdir(parents=True, exist_ok=True)
    files, digests = [], []
    for i in range(16):
        path = images / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return files, digests


def write_index(folder: Path, n: int, input_size: int, key: str, *, for_queries: bool) -> Path:
    """An index of ``n`` random ReLU features (model key ``key``) and a catalog of 16 generated
    images; ``for_queries``: with the stage records, the memory-mapped copy and the exported
    model a run of this code writes."""
    import pyarrow as pa

    from tasks.catalog import CATALOG_SCHEMA, write_catalog
    from tasks.features import store
    from tasks.features.model import DIM, ModelInfo
    from tasks.features.serving import index_copy, query_model
    from tasks.layout import CATALOG_FILE, EMBED, INDEX_FEATURES, QUERY_FEATURES, run_stages
    from tasks.storage import RunFolder
    from tasks.types import DataRef, Features, ModelSpec

    images = folder / "images"
    rng = np.random.default_rng(0)
    files, digests = catalog_images(images, rng)
    meta = {
        **ModelInfo("none", "random initialisation", 0).metadata(input_size),
        "model_key": key,
        "input_size": input_size,
    }

    def chunks(rows: int) -> Any:
        for start in range(0, rows, store.ROWS_PER_PART):
            m = min(store.ROWS_PER_PART, rows - start)
            emb = np.maximum(rng.standard_normal((m, DIM), dtype=np.float32), 0)
            yield store.table(np.arange(start, start + m, dtype=np.int64), emb)

    run = RunFolder(folder)
    stage = run.stage(EMBED, ["synthetic", n, input_size, key], code=[])
    base = stage.path("") if for_queries else folder
    store.write_tables(chunks(n), base / INDEX_FEATURES, {**meta, "split": "index", "rows": n})
    store.write_tables(chunks(1), base / QUERY_FEATURES, {**meta, "split": "query", "rows": 1})
    columns: dict[str, Any] = {
        "image_id": np.arange(n, dtype=np.int64),
        "uri": [files[i % 16] for i in range(n)],
        "sha256": [digests[i % 16] for i in range(n)],
        "width": np.full(n, 96, dtype=np.int32),
        "height": np.full(n, 96, dtype=np.int32),
        "version": ["synthetic"] * n,
    }
    for name in CATALOG_SCHEMA.names:
        columns.setdefault(name, pa.nulls(n, CATALOG_SCHEMA.field(name).type))
    collection = {"kind": "folder", "source": str(images), "limit": None}
    write_catalog(
        folder / CATALOG_FILE,
        pa.Table.from_pydict(columns, schema=CATALOG_SCHEMA),
        {"collection": collection, "next_id": n, "model_key": key, "input_size": input_size},
    )
    if for_queries:
        stage.finish(images=n)
        ref = DataRef(uri=str(base / INDEX_FEATURES), rows=n, fingerprint="synthetic")
        features = Features(index=ref, query=ref, model=meta, device="cpu")
        index_copy(features, run)
        query_model(ModelSpec("none", 0, "float32", input_size), run, key)
        run.commit(run_stages([]))
    return folder


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def _timed(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{command} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return wall


def interleaved(
    versions: dict[str, Path], repeats: int, measure: Callable[[str, Path], float]
) -> dict[str, Any]:
    """``measure(version, code)`` for each version in turn, ``repeats`` times; the medians and
    every value."""
    values: dict[str, list[float]] = {v: [] for v in versions}
    for _ in range(repeats):
        for version, code in versions.items():
            values[version].append(measure(version, code))
    return {
        v: {"median": _median(x), "values": [round(t, 2) for t in x]} for v, x in values.items()
    }


def case_help(versions: dict[str, Path], repeats: int, tmp: Path) -> dict[str, Any]:
    return {
        args: interleaved(
            versions,
            repeats,
            lambda v, code, a=args: _timed(_cli(*a.split(), "--help"), code, _env(code)),
        )
        for args in ("", "query")
    }


PHASES = """
import json, sys, time
t0 = time.perf_counter()
from tasks.ask import ask, lazy, load_forward, model_spec, open_index, query_sources
t1 = time.perf_counter()
index = open_index(sys.argv[1])
t2 = time.perf_counter()
forward = load_forward(model_spec(index.meta), index.model_file)
t3 = time.perf_counter()
ask(index, forward, query_sources([sys.argv[2]]), 10)
t4 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "index_open_s": t2 - t1, "model_load_s": t3 - t2,
                  "first_query_s": t4 - t3, "features_from": index.features_from}))
"""


def _query_image(tmp: Path) -> Path:
    """One 96-pixel PNG to ask with."""
    image = tmp / "query.png"
    if not image.exists():
        from PIL import Image

        rng = np.random.default_rng(7)
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(image)
    return image


def _indexes(versions: dict[str, Path], n: int, tmp: Path, size: int = 96) -> dict[str, Path]:
    folders = {}
    for version, code in versions.items():
        folder = tmp / f"index-{version}-{n}"
        if not folder.exists():
            write_index(folder, n, size, model_key(code, size), for_queries=version == "after")
        folders[version] = folder
    return folders


def case_query(versions: dict[str, Path], repeats: int, tmp: Path, n: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    image = _query_image(tmp)
    for size in (42, n):
        folders = _indexes(versions, size, tmp)
        result[str(size)] = interleaved(
            versions,
            repeats,
            lambda v, code, f=folders: _timed(
                _cli("query", str(image), "--index", str(f[v])), code, _env(code)
            ),
        )
        after = versions["after"]
        phases = []
        for _ in range(repeats):
            done = subprocess.run(
                [sys.executable, "-c", PHASES, str(folders["after"]), str(image)],
                cwd=after,
                env=_env(after),
                capture_output=True,
                text=True,
                check=True,
            )
            phases.append(json.loads(done.stdout.strip().splitlines()[-1]))
        result[str(size)]["after_phases"] = {
            k: (_median([p[k] for p in phases]) if k != "features_from" else phases[0][k])
            for k in phases[0]
        }
    return result


def _rss(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def case_serve(versions: dict[str, Path], repeats: int, tmp: Path, n: int) -> dict[str, Any]:
    import httpx

    folders = _indexes(versions, n, tmp)
    image = _query_image(tmp).read_bytes()
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in versions}
    for _ in range(repeats):
        for version, code in versions.items():
            port = 18000 + len(rows[version]) + (0 if version == "before" else 500)
            started = time.perf_counter()
            proc = subprocess.Popen(
                _cli("serve", "--index", str(folders[version]), "--port", str(port)),
                cwd=code,
                env=_env(code),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
                    while True:
                        if proc.poll() is not None:
                            raise RuntimeError(f"serve ({version}) exited {proc.returncode}")
                        try:
                            if client.get("/healthz").status_code == 200:
                                break
                        except httpx.TransportError:
                            time.sleep(0.05)
                    ready = time.perf_counter() - started
                    loaded = _rss(proc.pid)
                    resp = client.post(
                        "/search?k=10", files={"image": ("q.png", image)}, timeout=300
                    )
                    resp.raise_for_status()
                    searched = _rss(proc.pid)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=120)
            rows[version].append(
                {
                    "ready_s": ready,
                    "rss_ready_mib": loaded["VmRSS"],
                    "rss_after_search_mib": searched["VmRSS"],
                    "rss_file_after_search_mib": searched.get("RssFile", 0.0),
                }
            )
    return {
        v: {k: _median([r[k] for r in rs]) for k in rs[0]} | {"runs": rs} for v, rs in rows.items()
    }


def _run_args(out: Path) -> list[str]:
    return ["run", "--source", "sample", "--weights", "none", "--out", str(out)]


def case_rerun(versions: dict[str, Path], repeats: int, tmp: Path) -> dict[str, Any]:
    homes = {v: tmp / f"prefect-home-{v}" for v in versions}
    data = tmp / "data"
    envs = {
        v: _env(code, PREFECT_HOME=str(homes[v]), IMAGE_SEARCH_DATA=str(data))
        for v, code in versions.items()
    }
    for version, code in versions.items():  # the first runs: everything computed, API started
        _timed(_cli(*_run_args(tmp / f"sample-{version}")), code, envs[version], 3600)
    try:
        return interleaved(
            versions,
            repeats,
            lambda v, code: _timed(_cli(*_run_args(tmp / f"sample-{v}")), code, envs[v]),
        )
    finally:
        _stop_local_api(versions["after"], homes["after"])


def case_fresh(versions: dict[str, Path], repeats: int, tmp: Path) -> dict[str, Any]:
    counter = [0]

    def measure(version: str, code: Path) -> float:
        counter[0] += 1
        home = tmp / f"fresh-{counter[0]}"
        env = _env(code, PREFECT_HOME=str(home), IMAGE_SEARCH_DATA=str(tmp / "data"))
        try:
            return _timed(_cli(*_run_args(tmp / f"sample-{version}")), code, env)
        finally:
            _stop_local_api(code, home)
            shutil.rmtree(home, ignore_errors=True)

    return interleaved(versions, repeats, measure)


ENGINES = """
import json, sys, tempfile, time
from pathlib import Path
import numpy as np
from tasks.features import exported
from tasks.features.model import build_model, make_forward
size, batch, repeats = (int(a) for a in sys.argv[1:4])
model, _ = build_model("none", 0)
tf_forward = make_forward(model)
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "model.onnx"
    exported.export(model, path)
    ort_forward = exported.load(path)
images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
a, b = tf_forward(images), ort_forward(images)  # warm-up, and the difference
rel = float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)).max())
times = {"tensorflow": [], "onnxruntime": []}
for _ in range(repeats):
    for name, forward in (("tensorflow", tf_forward), ("onnxruntime", ort_forward)):
        t0 = time.perf_counter()
        forward(images)
        times[name].append(time.perf_counter() - t0)
print(json.dumps({"max_relative_difference": rel,
                  **{f"{k}_images_per_s": batch / float(np.median(v)) for k, v in times.items()}}))
"""


def case_engines(after: Path, repeats: int) -> dict[str, Any]:
    result = {}
    for size in (96, 224):
        done = subprocess.run(
            [sys.executable, "-c", ENGINES, str(size), "128", str(repeats)],
            cwd=after,
            env=_env(after),
            capture_output=True,
            text=True,
            check=True,
        )
        result[str(size)] = {
            k: round(v, 2) if "per_s" in k else v
            for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()
        }
    return result


def _stop_local_api(code: Path, home: Path) -> None:
    """Stop the local API a run of this code left for later commands in ``home``."""
    state = home / "image-search-api.json"
    if state.exists():
        subprocess.run(
            [Path(sys.executable).parent / "prefect", "server", "stop"],
            env=_env(code, PREFECT_HOME=str(home)),
            capture_output=True,
            check=False,
        )


def markdown(results: dict[str, Any]) -> str:
    def pair(entry: dict[str, Any]) -> str:
        before, after = entry["before"]["median"], entry["after"]["median"]
        return f"{before} | {after} | {before / after:.1f}×"

    lines = [
        f"Machine: {results['machine']}; load average before {results['load_before']:.2f}, "
        f"after {results['load_after']:.2f}; medians of {results['repeats']} interleaved runs.",
        "",
        "| case | before s | after s | speed-up |",
        "|---|---|---|---|",
    ]
    r = results["cases"]
    if "help" in r:
        lines.append(f"| `image-search --help` | {pair(r['help'][''])} |")
        lines.append(f"| `image-search query --help` | {pair(r['help']['query'])} |")
    if "query" in r:
        for size, entry in r["query"].items():
            lines.append(f"| `query` cold, {int(size):,} images | {pair(entry)} |")
    if "rerun" in r:
        lines.append(f"| quick-start rerun, nothing changed | {pair(r['rerun'])} |")
    if "fresh" in r:
        lines.append(f"| quick-start rerun on a fresh PREFECT_HOME | {pair(r['fresh'])} |")
    if "serve" in r:
        s = r["serve"]
        lines.append(
            f"| `serve` ready, {results['n']:,} images | {s['before']['ready_s']} | "
            f"{s['after']['ready_s']} | {s['before']['ready_s'] / s['after']['ready_s']:.1f}× |"
        )
        lines += [
            "",
            "| `serve` memory, MiB | before | after |",
            "|---|---|---|",
            f"| RSS when ready | {s['before']['rss_ready_mib']} | {s['after']['rss_ready_mib']} |",
            f"| RSS after the first search | {s['before']['rss_after_search_mib']} | "
            f"{s['after']['rss_after_search_mib']} |",
            f"| of which file pages (shared) | {s['before']['rss_file_after_search_mib']} | "
            f"{s['after']['rss_file_after_search_mib']} |",
        ]
    if "engines" in r:
        lines += [
            "",
            "| embedding 128 images | TensorFlow images/s | onnxruntime images/s | max relative "
            "difference |",
            "|---|---|---|---|",
        ]
        for size, e in r["engines"].items():
            lines.append(
                f"| {size} × {size} | {e['tensorflow_images_per_s']} | "
                f"{e['onnxruntime_images_per_s']} | {e['max_relative_difference']:.1e} |"
            )
    if "query" in r:
        for size, entry in r["query"].items():
            p = entry["after_phases"]
            lines.append(
                f"\nAfter, `query` at {int(size):,} images: imports {p['imports_s']} s, index "
                f"open {p['index_open_s']} s ({p['features_from']}), model load "
                f"{p['model_load_s']} s, first query {p['first_query_s']} s."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES), help=f"from {', '.join(CASES)}")
    parser.add_argument("--before", type=Path, required=True, help="the earlier code's folder")
    parser.add_argument(
        "--after", type=Path, default=REPO, help="this code's folder (default: here)"
    )
    parser.add_argument("--n", type=int, default=100_000, help="index images (query, serve)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args()
    from tasks.hardware import cpu_count, cpu_features

    versions = {"before": args.before.resolve(), "after": args.after.resolve()}
    results: dict[str, Any] = {
        "machine": f"{cpu_features().model}, {cpu_count()} cores",
        "load_before": os.getloadavg()[0],
        "repeats": args.repeats,
        "n": args.n,
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as scratch:
        tmp = Path(scratch)
        for case in args.cases:
            if case == "help":
                results["cases"]["help"] = case_help(versions, args.repeats, tmp)
            elif case == "query":
                results["cases"]["query"] = case_query(versions, args.repeats, tmp, args.n)
            elif case == "serve":
                results["cases"]["serve"] = case_serve(versions, args.repeats, tmp, args.n)
            elif case == "rerun":
                results["cases"]["rerun"] = case_rerun(versions, args.repeats, tmp)
            elif case == "fresh":
                results["cases"]["fresh"] = case_fresh(versions, args.repeats, tmp)
            elif case == "engines":
                results["cases"]["engines"] = case_engines(versions["after"], args.repeats)
            print(json.dumps({case: results["cases"][case]}, indent=1), flush=True)
    results["load_after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / "startup.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
