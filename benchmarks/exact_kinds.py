"""Exact and certified search on three kinds of data, the code of a given git revision beside
the current one, against FAISS IndexFlatL2.

Kinds: ``uniform`` (independent uniform [0, 1) features), ``clustered`` (200 gamma centres,
ReLU of centre + noise, 1 % of index rows duplicated) and ``real`` (ResNet50 features of the
built-in sample's photo crops, random seeded weights: ImageNet weights are not available
here). Methods: ``exact`` (``search_prepared``), ``certified`` (``search_certified``, format
chosen at run time), both also as ``exact@REV``/``certified@REV`` from ``git show REV:...``
loaded as temporary modules, and ``faiss``. Every (kind, method) runs in its own child process
per repeat, repeats interleaved; the search is timed in CPU seconds (every thread of the
process) and wall seconds, after a warm-up. Small batches (1, 4, 16 queries) are timed per
call, median of several calls. Answers are checked against a float64 brute force on sampled
queries and, for every query, the current certified against the current exact.
"""

from __future__ import annotations

import importlib.util
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import run_child

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 5000  # crops generated and embedded at a time (one seed each): memory stays flat
CACHE = ROOT / "benchmarks" / "out" / "cache"
FULL: dict[str, Any] = {
    # 3,000 queries, not 10,000: with the machine shared (load 6-8 on 2 cores) one search of
    # 10,000 took two minutes of wall time, and 5 methods x 3 kinds x 3 repeats did not fit.
    "sizes": {"uniform": (90_000, 3_000), "clustered": (90_000, 3_000), "real": (18_000, 2_000)},
    "dim": 2048,
    "k": 10,
    "repeats": 3,
    "check": 200,
    "batches": [1, 4, 16],
    "calls": 7,
    "old": "09d8677",
}
QUICK: dict[str, Any] = {
    **FULL,
    "sizes": {"uniform": (3_000, 300), "clustered": (3_000, 300)},
    "repeats": 1,
    "check": 50,
    "batches": [1],
    "calls": 2,
}
METHODS = ["exact", "exact@old", "certified", "certified@old", "faiss"]


def real_embeddings(n: int, cache: Path = CACHE, batch: int = 128) -> np.ndarray:
    """(n, 2048) float32 ResNet50 features (random seeded weights: ImageNet weights are not
    available here) of the built-in sample's photo crops, ``CHUNK`` crops per seed, each
    chunk cached in ``cache`` once embedded (about 4 minutes a chunk on 2 busy cores)."""
    chunks = []
    forward = None
    t0 = time.perf_counter()
    for c in range((n + CHUNK - 1) // CHUNK):
        path = cache / f"sample-crops-resnet50-none-seed{1000 + c}-{CHUNK}.npy"
        if not path.exists():
            if forward is None:
                from tasks.features.model import build_model, make_forward

                forward = make_forward(build_model("none", seed=0)[0])
            from tasks.sources.sample import make_sample_images

            images = make_sample_images(CHUNK, seed=1000 + c)
            out = np.concatenate([forward(images[b : b + batch]) for b in range(0, CHUNK, batch)])
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, out.astype(np.float32))
            tmp.replace(path)
            spent = time.perf_counter() - t0
            print(f"    embedded chunk {c} ({CHUNK} crops) after {spent:.0f} s", flush=True)
        chunks.append(np.load(path))
    return np.concatenate(chunks)[:n]


def make_kind(kind: str, n_index: int, n_queries: int, dim: int) -> tuple[Any, Any]:
    """(index, queries) float32 of one data kind."""
    rng = np.random.default_rng(0)
    if kind == "uniform":
        return (
            rng.random((n_index, dim), dtype=np.float32),
            rng.random((n_queries, dim), dtype=np.float32),
        )
    if kind == "clustered":
        centres = rng.gamma(0.5, 1.0, (200, dim)).astype(np.float32)

        def draw(n: int) -> np.ndarray:
            x = centres[rng.integers(0, 200, n)]
            x += np.float32(0.3) * rng.standard_normal((n, dim), dtype=np.float32)
            return np.maximum(x, 0, out=x)

        index, queries = draw(n_index), draw(n_queries)
        n_dup = max(1, n_index // 100)
        src = rng.choice(n_index // 2, n_dup, replace=False)
        index[n_index // 2 + rng.choice(n_index - n_index // 2, n_dup, replace=False)] = index[src]
        return index, queries
    feats = real_embeddings(n_index + n_queries)
    return feats[:n_index], feats[n_index:]


def _old_module(name: str, rev: str, tmp: Path) -> Any:
    """``tasks/search/{name}.py`` as it was at ``rev``, imported as a temporary module."""
    src = subprocess.run(
        ["git", "show", f"{rev}:tasks/search/{name}.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = tmp / f"old_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"old_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def method_child(
    method: str,
    data_dir: str,
    kind: str,
    k: int,
    tag: str,
    batches: list[int],
    calls: int,
    old: str,
) -> dict[str, Any]:
    """Prepare one method's index, warm up, time the whole batch and small batches."""
    d = Path(data_dir)
    index = np.load(d / f"{kind}-index.npy", mmap_mode="r")
    queries = np.ascontiguousarray(np.load(d / f"{kind}-queries.npy"))
    base, _, rev = method.partition("@")
    extra: dict[str, Any] = {}
    holder: dict[str, Any] = {}
    if base == "faiss":
        import faiss

        flat = faiss.IndexFlatL2(index.shape[1])
        flat.add(np.ascontiguousarray(index))

        def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            sq, ids = flat.search(q, k)
            return np.sqrt(np.maximum(sq, 0)), ids

    elif base == "exact":
        if rev:
            mod = _old_module("exact", old, d)
        else:
            import tasks.search.exact as mod
        prepared = mod.prepare_index(index)

        def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return mod.search_prepared(prepared, q, k)  # type: ignore[no-any-return]

    else:
        if rev:
            mod = _old_module("certified", old, d)
        else:
            import tasks.search.certified as mod
        t0 = time.perf_counter()
        ix = mod.prepare_certified(index)
        extra["prepare_s"] = time.perf_counter() - t0
        extra["format"] = f"{ix.choice.fmt} ({ix.choice.reason})"
        holder["stats"] = mod.CertifiedStats()

        def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return mod.search_certified(ix, q, k, stats=holder["stats"])  # type: ignore[no-any-return]

    search(queries[:32])  # warm-up: libraries loaded, scratch touched
    if holder:
        holder["stats"] = type(holder["stats"])()  # the timed search's own counts
    c0, t0 = _cpu(), time.perf_counter()
    _dist, pos = search(queries)
    cpu_s, wall_s = _cpu() - c0, time.perf_counter() - t0
    if holder:
        extra["stats"] = holder["stats"].as_dict()
    np.save(d / f"{kind}-{method}-{tag}.npy", pos)
    small = {}
    for b in batches:
        walls, cpus = [], []
        for i in range(calls):
            q = queries[(i * b) % len(queries) :][:b]
            c1, t1 = _cpu(), time.perf_counter()
            search(q)
            walls.append(time.perf_counter() - t1)
            cpus.append(_cpu() - c1)
        small[str(b)] = {
            "wall_ms": 1e3 * statistics.median(walls),
            "cpu_ms": 1e3 * statistics.median(cpus),
        }
    return {"cpu_s": cpu_s, "wall_s": wall_s, "small": small, **extra}


def _reference(index: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions (n, k) of a stable sort of float64 distances from difference vectors."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for i, q in enumerate(queries.astype(np.float64)):
        full = np.empty(len(index))
        for s in range(0, len(index), 8192):
            diff = index[s : s + 8192].astype(np.float64) - q
            full[s : s + 8192] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        out[i] = np.argsort(full, kind="stable")[:k]
    return out


def exact_kinds(quick: bool = False) -> dict[str, Any]:
    """Exact (current and old) and certified (current and old) vs FAISS on three data kinds."""
    from tasks.hardware import cpu_features

    size = QUICK if quick else FULL
    k, dim = size["k"], size["dim"]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    checks: dict[tuple[str, str], int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-kinds-") as tmp:
        d = Path(tmp)
        samples = {}
        for kind, (n_index, n_queries) in size["sizes"].items():
            index, queries = make_kind(kind, n_index, n_queries, dim)
            np.save(d / f"{kind}-index.npy", index)
            np.save(d / f"{kind}-queries.npy", queries)
            pick = np.random.default_rng(1).choice(n_queries, min(size["check"], n_queries), False)
            samples[kind] = (np.sort(pick), _reference(index, queries[np.sort(pick)], k))
            del index, queries
        for r in range(size["repeats"]):
            for kind in size["sizes"]:
                for method in METHODS:
                    args = {
                        "method": method.replace("@old", f"@{size['old']}"),
                        "data_dir": tmp,
                        "kind": kind,
                        "k": k,
                        "tag": str(r),
                        "batches": size["batches"],
                        "calls": size["calls"],
                        "old": size["old"],
                    }
                    res = run_child("benchmarks.exact_kinds:method_child", args, grace_s=0)
                    runs.setdefault((kind, method), []).append(res)
                    print(
                        f"    repeat {r} {kind} {method}: cpu {res['cpu_s']:.1f} s, "
                        f"wall {res['wall_s']:.1f} s {res.get('stats', '')}",
                        flush=True,
                    )
        for kind, (pick, ref) in samples.items():
            for method in METHODS:
                got = np.load(d / f"{kind}-{method.replace('@old', '@' + size['old'])}-0.npy")
                checks[(kind, method)] = int((got[pick] == ref).all(axis=1).sum())
            a = np.load(d / f"{kind}-certified-0.npy")
            b = np.load(d / f"{kind}-exact-0.npy")
            checks[(kind, "certified == exact, all queries")] = int((a == b).all(axis=1).sum())
    return _summarise(size, runs, checks, cpu_features().summary(), cpu_features().model)


def _summarise(
    size: dict[str, Any],
    runs: dict[tuple[str, str], list[dict[str, Any]]],
    checks: dict[tuple[str, str], int],
    flags: dict[str, bool],
    model: str,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    pick_of = {kind: range(min(size["check"], nq)) for kind, (_, nq) in size["sizes"].items()}
    for kind, (n_index, n_queries) in size["sizes"].items():
        med = {m: statistics.median(r["cpu_s"] for r in runs[(kind, m)]) for m in METHODS}
        wall = {m: statistics.median(r["wall_s"] for r in runs[(kind, m)]) for m in METHODS}
        for m in METHODS:
            rs = runs[(kind, m)]
            row: dict[str, Any] = {
                "kind": f"{kind} {n_queries:,} x {n_index:,}",
                "method": m.replace("@old", f"@{size['old']}"),
                "CPU s (median)": round(med[m], 2),
                "CPU runs": ", ".join(f"{r['cpu_s']:.1f}" for r in rs),
                "wall s (median)": round(wall[m], 2),
                "vs FAISS per CPU-s": round(med["faiss"] / med[m], 3),
                "float64-identical (sampled)": f"{checks[(kind, m)]}/{len(pick_of[kind])}",
            }
            for b in size["batches"]:
                ms = statistics.median(r["small"][str(b)]["wall_ms"] for r in rs)
                cpu_ms = statistics.median(r["small"][str(b)]["cpu_ms"] for r in rs)
                row[f"{b} q: wall ms / CPU ms"] = f"{ms:.1f} / {cpu_ms:.1f}"
            if "stats" in rs[-1]:
                st = rs[-1]["stats"]
                row["candidates / k"] = st.get("candidate_factor")
                row["float64 / k"] = st.get("remeasure_factor", "")
                row["fallback"] = st.get("fallback_fraction")
                row["max candidates"] = st.get("max_candidates")
            rows.append(row)
        targets.append(
            {
                "target": f"{kind}: exact >= 0.95 x FAISS per CPU-s",
                "measured": round(med["faiss"] / med["exact"], 3),
                "met": med["faiss"] / med["exact"] >= 0.95,
            }
        )
        if kind != "uniform":
            targets.append(
                {
                    "target": f"{kind}: certified >= 1.2 x FAISS per CPU-s",
                    "measured": round(med["faiss"] / med["certified"], 3),
                    "met": med["faiss"] / med["certified"] >= 1.2,
                }
            )
        same = checks[(kind, "certified == exact, all queries")]
        targets.append(
            {
                "target": f"{kind}: certified answers identical to exact on every query",
                "measured": f"{same}/{n_queries}",
                "met": same == n_queries,
            }
        )
    certified = runs[(next(iter(size["sizes"])), "certified")][-1]
    return {
        "size": size,
        "rows": rows,
        "targets": targets,
        "notes": [
            f"CPU: {model}; flags {', '.join(f for f, on in flags.items() if on)}",
            f"k = {size['k']}, d = {size['dim']}; {size['repeats']} repeats, methods and kinds "
            "interleaved, each run in a fresh process; CPU s = user + system of the process "
            "during the search of every query",
            f"certified format: {certified.get('format')}",
        ],
        "raw": {"runs": {f"{k}|{m}": rs for (k, m), rs in runs.items()}},
    }
