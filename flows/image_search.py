"""The ``image-search`` flow: download → decode → split → embed → KNN backends → compare → report.

Wiring only: every stage lives in ``tasks/`` and passes references, never arrays.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.params import SearchParams
from tasks.common import ensure_writable_dir, folder_lock, remove_orphan_temps
from tasks.compare import COMPARE_FILE, NEIGHBORS_FILE, compare
from tasks.decode import with_limit
from tasks.download import download
from tasks.embed import FEATURES_DIR, embed
from tasks.knn import choose_backends, knn, validate_k
from tasks.report import RESULTS_FILE, report
from tasks.show import SAMPLES_FILE, show
from tasks.split import SPLIT_FILE, check_split, split


@flow(name="image-search", log_prints=True)
def image_search(params: SearchParams = SearchParams()) -> dict[str, str]:  # noqa: B008
    """Embed STL-10 images with ResNet50, search neighbours on GPU and CPU, prove they agree.

    Returns the paths of the outputs, keyed by name.
    """
    out_dir = ensure_writable_dir(Path(params.out).expanduser().resolve(), "Output folder")
    out = str(out_dir)
    # One run at a time per output folder; a second one waits and says so.
    with folder_lock(out_dir, "Output folder"):
        for orphan in remove_orphan_temps(out_dir):
            print(f"removed {orphan}, left behind by an interrupted run")
        backends = choose_backends(params.backends)
        dataset = with_limit(download(params.source, params.data_dir), params.limit)
        # Configuration errors stop the run before any output is written.
        n_index, _ = check_split(dataset.rows, params.split_ratio)
        validate_k(params.k, n_index)
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
    return {
        "samples": str(out_dir / SAMPLES_FILE),
        "split": str(out_dir / SPLIT_FILE),
        "features": str(out_dir / FEATURES_DIR),
        "neighbors": str(out_dir / NEIGHBORS_FILE),
        "compare": str(out_dir / COMPARE_FILE),
        "results": str(out_dir / RESULTS_FILE),
    }
