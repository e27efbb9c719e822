"""The ``image-search`` flow: source → catalog (list, hash, embed what is new) → samples → split
→ features → KNN backends → compare → evaluate (quality, duplicates) → report (artifacts and
``report.html``), committed as one set of outputs.

Two modes (:mod:`tasks.split`): STL-10 sources are the seed's benchmark (a 9:1 split, queries
held out); every other collection puts every image in the index and compares the backends by
leave-one-out search of a sample of its images.

Wiring only: every stage lives in ``tasks/`` and passes references, never arrays.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import State
from pydantic import ValidationError

from flows import sharded
from flows.params import (
    DEFAULTS,
    Ann,
    Backends,
    BatchSize,
    Cluster,
    DataDir,
    GpuMemoryFraction,
    InputSize,
    K,
    Limit,
    MaxErrorRate,
    NQueries,
    NResults,
    NShow,
    Out,
    Precision,
    SearchParams,
    Seed,
    Source,
    SplitRatio,
    Stl10Set,
    Tolerance,
    Weights,
)
from flows.reporting import failed, quiet_user_errors, separate_folders, show_task_logs
from tasks import layout
from tasks.catalog import check_error_rate
from tasks.compare import compare
from tasks.errors import ImageSearchError, param
from tasks.features.embed import catalog, check_input_size, embed
from tasks.features.model import reuse_models, weights_path
from tasks.features.serving import serving
from tasks.report.evaluate import evaluate_task
from tasks.report.html import html_report
from tasks.report.report import RANDOM_WEIGHTS, report
from tasks.report.samples import show
from tasks.search.backends import choose_backends
from tasks.search.k import check_k
from tasks.search.knn import knn, search_features
from tasks.sources.collection import Request, open_source
from tasks.sources.download import fetch_with_retries
from tasks.split import check_collection, check_split, run_mode, split
from tasks.storage import RunFolder, ensure_writable_dir, folder_lock
from tasks.types import ModelSpec


@flow(name="image-search", log_prints=True)
def image_search(
    source: Source = DEFAULTS.source,
    stl10_set: Stl10Set = DEFAULTS.stl10_set,
    out: Out = DEFAULTS.out,
    data_dir: DataDir = DEFAULTS.data_dir,
    limit: Limit = DEFAULTS.limit,
    seed: Seed = DEFAULTS.seed,
    split_ratio: SplitRatio = DEFAULTS.split_ratio,
    n_queries: NQueries = DEFAULTS.n_queries,
    n_show: NShow = DEFAULTS.n_show,
    weights: Weights = DEFAULTS.weights,
    batch_size: BatchSize = DEFAULTS.batch_size,
    precision: Precision = DEFAULTS.precision,
    input_size: InputSize = DEFAULTS.input_size,
    max_error_rate: MaxErrorRate = DEFAULTS.max_error_rate,
    gpu_memory_fraction: GpuMemoryFraction = DEFAULTS.gpu_memory_fraction,
    backends: Backends = DEFAULTS.backends,
    cluster: Cluster = DEFAULTS.cluster,
    ann: Ann = DEFAULTS.ann,
    k: K = DEFAULTS.k,
    tolerance: Tolerance = DEFAULTS.tolerance,
    n_results: NResults = DEFAULTS.n_results,
) -> dict[str, str] | State:
    """Index a collection (your images or STL-10) with ResNet50, search neighbours on GPU and
    CPU, prove they agree, and measure the search where labels exist.

    Every parameter is its own typed field (bounds and descriptions from ``flows.params``), so
    a deployment run overrides one and keeps the rest. Returns the paths of the outputs, keyed
    by name, ``report`` (report.html) last; a problem the user can fix ends the run Failed with
    its message alone.
    """
    quiet_user_errors()
    show_task_logs()
    try:
        params = SearchParams(
            source=source,
            stl10_set=stl10_set,
            out=out,
            data_dir=data_dir,
            limit=limit,
            seed=seed,
            split_ratio=split_ratio,
            n_queries=n_queries,
            n_show=n_show,
            weights=weights,
            batch_size=batch_size,
            precision=precision,
            input_size=input_size,
            max_error_rate=max_error_rate,
            gpu_memory_fraction=gpu_memory_fraction,
            backends=backends,
            cluster=cluster,
            ann=ann,
            k=k,
            tolerance=tolerance,
            n_results=n_results,
        )
        separate_folders(params)
        return _search(params)
    except (ImageSearchError, ValidationError) as exc:
        return failed(exc)


# What else a run can change when k exceeds its index.
MORE_IMAGES = f"or use more images ({param('limit')}) or a larger {param('split_ratio')}"


def _search(params: SearchParams) -> dict[str, str]:
    """The stages of one run, wired; returns the paths of the outputs, keyed by name."""
    out_dir = ensure_writable_dir(Path(params.out).expanduser().resolve(), "Output folder")
    out = str(out_dir)
    run = RunFolder(out_dir)
    # One run at a time per output folder; a second one waits and says so.
    with folder_lock(out_dir, "Output folder"), reuse_models():
        for orphan in run.clean_orphans():
            print(f"removed {orphan}, left behind by an interrupted run")
        if moved := run.recover():
            print(f"finished putting the outputs of an interrupted run in place: {moved}")
        backends = choose_backends(params.backends)
        collection = open_source(
            Request(
                source=params.source,
                stl10_set=params.stl10_set,
                limit=params.limit,
                data_dir=Path(params.data_dir).expanduser() if params.data_dir else None,
                skip=(out,),
            ),
            fetch=fetch_with_retries,
        )
        spec = ModelSpec(
            weights=params.weights,
            seed=params.seed,
            precision=params.precision,
            input_size=check_input_size(params.input_size),
            gpu_memory_fraction=params.gpu_memory_fraction,
        )
        weights_path(params.weights)  # a missing file stops the run before any write
        if params.weights.strip().lower() == "none":
            get_run_logger().warning(RANDOM_WEIGHTS)
        mode = run_mode(collection.kind)
        # Configuration errors stop the run before anything is written: the listing bounds
        # how many images the catalog can hold.
        check_size(mode, len(collection.items()), params)
        # Every stage writes into the staging area; the outputs in place change only below.
        # Sharded over a Dask cluster when one is set; else in a task of this process.
        cluster = params.cluster
        embed_runner = None if cluster is None else sharded.embed_runner(cluster)
        catalog_ref = catalog(collection, out, spec, params.batch_size, embed_runner)
        try:
            check_error_rate(catalog_ref, params.max_error_rate)
        except ImageSearchError:
            run.commit([layout.CATALOG.name])  # keep errors.parquet where the message says it
            raise
        # Some images may have failed: check again with those that are usable.
        check_size(mode, catalog_ref.rows, params)
        samples = show(catalog_ref, out, params.n_show, params.seed)
        split_ref = split(catalog_ref, out, params.split_ratio, params.seed, mode, params.n_queries)
        features = embed(catalog_ref, split_ref, out, spec)
        serving(features, out, spec, params.ann)  # what makes the index quick to ask
        # Backends run one after another: each gets every core, so the timings are honest.
        loo = mode == "collection"  # the queries are index images: each leaves itself out
        runs = [knn(features, out, name, params.k, loo) for name in backends]
        if cluster is not None:  # one more backend: a nested flow on the Dask task runner
            searcher, code = sharded.searcher(cluster), sharded.SEARCH_CODE
            runs.append(
                search_features(
                    features, run, sharded.SHARDED, params.k, searcher, code, exclude_self=loo
                )
            )
        summary = compare(runs, features, out, params.tolerance, mode)
        evaluation = evaluate_task(catalog_ref, features, out, mode)
        results = report(summary, runs, features, catalog_ref, out, params.n_results, params.seed)
        pictures = {
            "samples": samples,
            "results": results,
            "duplicates": str(evaluation["gallery"]),
        }
        html_report(summary, features, catalog_ref, evaluation, pictures, out)
        # The new outputs replace the old ones as one set, even when the verdict is a failure:
        # compare.json and report.html then say why.
        run.commit(layout.run_stages(r.backend for r in runs if r.available))
    if not summary.passed:
        raise ImageSearchError(
            f"{summary.failure} See {out_dir / layout.REPORT_FILE} and "
            f"{out_dir / layout.COMPARE_FILE}."
        )
    return {
        name: str(out_dir / rel)
        for name, rel in layout.RUN_OUTPUTS.items()
        if name != "quality" or "quality" in evaluation
    }


def check_size(mode: str, n: int, params: SearchParams) -> None:
    """Stop before anything is written when ``n`` images cannot give every query ``k``
    neighbours: a benchmark needs both sides of its split, a collection ``k`` other images."""
    if mode == "collection":
        check_collection(n, params.k)
    else:
        n_index, _ = check_split(n, params.split_ratio)
        check_k(params.k, n_index, fix=MORE_IMAGES)
