"""The ``image-search`` flow: download → decode → split → embed → KNN backends → compare → report.

Wiring only: every stage lives in ``tasks/`` and passes references, never arrays.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.params import SearchParams
from tasks.compare import COMPARE_FILE, NEIGHBORS_FILE, compare, stages_of
from tasks.errors import ImageSearchError
from tasks.features.embed import FEATURES_DIR, embed
from tasks.features.model import weights_identity
from tasks.report.report import RESULTS_FILE, report
from tasks.report.samples import SAMPLES_FILE, show
from tasks.search.backends import choose_backends, validate_k
from tasks.search.knn import knn
from tasks.sources.resolve import download_task
from tasks.sources.stl10 import with_limit
from tasks.split import SPLIT_FILE, check_split, split
from tasks.storage import RunFolder, ensure_writable_dir, folder_lock


@flow(name="image-search", log_prints=True)
def image_search(params: SearchParams = SearchParams()) -> dict[str, str]:  # noqa: B008
    """Embed STL-10 images with ResNet50, search neighbours on GPU and CPU, prove they agree.

    Returns the paths of the outputs, keyed by name.
    """
    out_dir = ensure_writable_dir(Path(params.out).expanduser().resolve(), "Output folder")
    out = str(out_dir)
    run = RunFolder(out_dir)
    # One run at a time per output folder; a second one waits and says so.
    with folder_lock(out_dir, "Output folder"):
        for orphan in run.clean_orphans():
            print(f"removed {orphan}, left behind by an interrupted run")
        if moved := run.recover():
            print(f"finished putting the outputs of an interrupted run in place: {moved}")
        backends = choose_backends(params.backends)
        dataset = with_limit(download_task()(params.source, params.data_dir), params.limit)
        # Configuration errors stop the run before anything is written.
        n_index, _ = check_split(dataset.rows, params.split_ratio)
        validate_k(params.k, n_index)
        weights_identity(params.weights)
        # Every stage writes into the staging area; the outputs in place change only below.
        show(dataset, out, params.n_show, params.seed)
        split_ref = split(dataset, out, params.split_ratio, params.seed)
        features = embed(
            dataset,
            split_ref,
            out,
            params.weights,
            params.batch_size,
            params.seed,
            params.precision,
            params.gpu_memory_fraction,
        )
        # Backends run one after another: each gets every core, so the timings are honest.
        runs = [knn(features, out, name, params.k) for name in backends]
        summary = compare(runs, features, out, params.tolerance)
        report(summary, runs, features, dataset, out, params.n_results, params.seed)
        # The new outputs replace the old ones as one set, even when the verdict is a failure:
        # compare.json then says why.
        run.commit(["samples", "split", "embed", *stages_of(runs), "compare", "results"])
    if not summary.passed:
        raise ImageSearchError(f"{summary.failure} See {out_dir / COMPARE_FILE}.")
    return {
        "samples": str(out_dir / SAMPLES_FILE),
        "split": str(out_dir / SPLIT_FILE),
        "features": str(out_dir / FEATURES_DIR),
        "neighbors": str(out_dir / NEIGHBORS_FILE),
        "compare": str(out_dir / COMPARE_FILE),
        "results": str(out_dir / RESULTS_FILE),
    }
