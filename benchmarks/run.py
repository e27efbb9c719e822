"""Run the benchmarks: ``python -m benchmarks.run [--quick] [--out DIR] [CASE ...]``.

Writes ``results.md`` (tables, targets met or not) and ``results.json`` (everything, raw runs
included) to ``--out``. ``--quick`` uses tiny sizes and finishes in well under a minute (CI);
the full sizes are run by hand and recorded in BENCHMARKS.md. Cases not run by default are
run by naming them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import (
    CASES,
    machine,
    markdown,
    raise_interrupt_on_sigterm,
    register,
    run_cases,
)

register("search", "benchmarks.search:search", "Exact k-NN search: GEMM ceiling and backends")
register(
    "hardware",
    "benchmarks.hardware:hardware",
    "GEMM rate per CPU-second of float32, bfloat16, float16 and int8 kernels",
)
register(
    "certified",
    "benchmarks.certified:certified_search",
    "Certified reduced-precision search vs exact_knn, FAISS, scikit-learn (k = 3, 10)",
)
register(
    "exact-kinds",
    "benchmarks.exact_kinds:exact_kinds",
    "Exact and certified (current and an older revision) vs FAISS on uniform, clustered and "
    "real features",
    default=False,
)
register(
    "million",
    "benchmarks.million:million",
    "Asking a large index: exact (certified int8) and approximate tiers vs FAISS, build, service",
    default=False,
)
register("decode", "benchmarks.decode:decode", "Memory-map 100,000 STL-10 images")
register(
    "decoders",
    "benchmarks.collections:decoders",
    "Decode photo-sized JPEG/PNG/WebP to model input: Pillow, draft, simplejpeg, pyvips",
)
register(
    "incremental",
    "benchmarks.collections:incremental",
    "Re-index a folder grown by 1 % against a cold index",
)
register(
    "archives",
    "benchmarks.archives:archives",
    "Stream a tar archive of images (peak memory vs a folder) and read one member alone",
    default=False,
)
register(
    "embed",
    "benchmarks.pipeline:embed_overhead",
    "Embed stage throughput over a bare forward pass",
    default=False,
)
register("flow", "benchmarks.pipeline:full_flow", "Whole flow: wall time and RSS", default=False)
register("rerun", "benchmarks.pipeline:rerun_cost", "Rerun with unchanged inputs", default=False)
register(
    "shards",
    "benchmarks.shards:shards",
    "Sharded exact search on a Dask LocalCluster vs in-process",
    default=False,
)
register(
    "embed-shards",
    "benchmarks.shards:embed_shards",
    "Sharded embedding on a Dask LocalCluster vs in-process",
    default=False,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("cases", nargs="*", help=f"cases to run (all: {', '.join(CASES)})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="results folder")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    names = args.cases or [c.name for c in CASES.values() if c.default]
    command = shlex.join(["python", "-m", "benchmarks.run", *(argv or sys.argv[1:])])

    raise_interrupt_on_sigterm()
    t0 = time.perf_counter()
    # Every child's temporary folders go below one scratch folder, removed when the run ends
    # however it ends: what a killed child could not clean up goes with it.
    with tempfile.TemporaryDirectory(prefix="bench-run-") as scratch:
        os.environ["TMPDIR"] = scratch
        info = machine()
        results = run_cases(names, args.quick)
    total = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "machine": info, "seconds": total, "results": results}
    (args.out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    report = markdown(results, info, command) + f"\nTotal wall time {total:.1f} s.\n"
    (args.out / "results.md").write_text(report)
    print(report)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; temporary folders removed, no results written", file=sys.stderr)
        sys.exit(130)
