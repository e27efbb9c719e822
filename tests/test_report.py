"""What a person reads: the backends table (verdict first, rounded), the summary, and artifact
keys that keep each deployment's history apart."""

from __future__ import annotations

import pytest

from tasks.compare import Agreement, BackendResult, Comparison
from tasks.report import artifact_key
from tasks.report.report import backend_table, summary_markdown
from tasks.types import DataRef, Features


def _comparison(faiss_error: float = 2.636845536585497e-06) -> Comparison:
    agreement = Agreement(
        max_abs_deviation=7.62939453125e-06,
        max_rel_deviation=1.7e-07,
        median_neighbor_distance=42.46,
        abs_deviation_over_median_distance=1.8e-07,
        index_agreement=0.999876543,
        rows_identical=29,
        rows_tied=1,
        rows_mismatched=0,
        tie_rtol=1e-6,
        tolerance=1.0,
        distances_pass=True,
        passed=True,
        worst_query=None,
    )
    timing = {"fit_seconds": 0.0004123, "load_seconds": 0.01, "cores_used": 1.93}
    return Comparison(
        reference="sklearn",
        n_queries=30,
        k=3,
        tolerance=1.0,
        compared=["faiss"],
        passed=True,
        backends={
            "sklearn": BackendResult(
                device="cpu",
                available=True,
                search_seconds=0.1002345,
                speedup_search=1.0,
                max_abs_error_vs_exact=0.000123456,
                exact_error_pass=True,
                **timing,
            ),
            "cuml": BackendResult(device="gpu", available=False, reason="no CUDA device"),
            "faiss": BackendResult(
                device="cpu",
                available=True,
                search_seconds=0.0075123,
                speedup_search=13.342412,
                max_abs_error_vs_exact=faiss_error,
                exact_error_pass=True,
                agreement=agreement,
                **timing,
            ),
        },
    )


def test_backend_table_puts_the_verdict_first_and_rounds() -> None:
    rows = backend_table(_comparison())
    faiss = next(r for r in rows if r["backend"] == "faiss")
    assert list(faiss)[:5] == ["backend", "status", "speedup", "agreement", "ties"]
    assert faiss["status"] == "agrees" and faiss["speedup"] == 13.3
    assert faiss["agreement"] == 0.9999 and faiss["ties"] == 1
    assert faiss["error vs exact"] == 2.6e-06 and faiss["search s"] == 0.00751
    cuml = next(r for r in rows if r["backend"] == "cuml")
    assert cuml["status"] == "unavailable: no CUDA device"
    assert next(r for r in rows if r["backend"] == "sklearn")["status"] == "reference"


def test_summary_names_every_verdict() -> None:
    ref = DataRef(uri="/data/unlabeled_X.bin", rows=300, fingerprint="x")
    feats = Features(
        index=ref.model_copy(update={"rows": 270}),
        query=ref.model_copy(update={"rows": 30}),
        model={"weights": "none", "random_init": True},
        device="cpu",
    )
    text = summary_markdown(_comparison(), feats, ref)
    assert "random weights" in text and "cuml**: unavailable: no CUDA device" in text
    assert "faiss vs sklearn: agree" in text and "13.34× faster" in text


@pytest.mark.parametrize(
    ("deployment", "key"),
    [(None, "backends"), ("gpu", "gpu-backends"), ("Local Dev_2", "local-dev-2-backends")],
)
def test_artifact_keys_carry_the_deployment(
    deployment: str | None, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if deployment is not None:
        monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", deployment)
    assert artifact_key("backends") == key
