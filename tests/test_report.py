"""What a person reads: the backends table (verdict first, rounded), the summary, report.html
(rendered by Debian's Chromium after a real run, in the e2e tier), and artifact keys that keep
each deployment's history apart."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tasks.agreement import Agreement
from tasks.compare import BackendResult, Comparison
from tasks.report import artifact_key
from tasks.report.html import render
from tasks.report.report import backend_table, summary_markdown
from tasks.types import CatalogRef, DataRef, Features


def _comparison(
    faiss_error: float = 2.636845536585497e-06, failure: str | None = None
) -> Comparison:
    agreement = Agreement(
        max_abs_deviation=7.62939453125e-06,
        max_rel_deviation=1.7e-07,
        median_neighbor_distance=42.46,
        abs_deviation_over_median_distance=1.8e-07,
        index_agreement=0.999876543,
        rows_identical=29,
        rows_tied=1,
        rows_tied_exact=0,
        rows_tied_float32=1,
        rows_mismatched=0,
        unit_roundoff={"reference": 2**-24, "backend": 2**-24},
        float32_ties=[],
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
        passed=failure is None,
        failure=failure,
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


def _picture(path: Path, shade: int) -> Path:
    Image.fromarray(np.full((20, 30, 3), shade, np.uint8)).save(path)
    return path


def _page(tmp_path: Path, **kw: Any) -> str:
    ref = DataRef(uri="/data/catalog.parquet", rows=300, fingerprint="x")
    feats = Features(
        index=ref.model_copy(update={"rows": 300}),
        query=ref.model_copy(update={"rows": 30}),
        model={"weights": "none", "random_init": True, "input_size": 96},
        device="cpu",
    )
    catalog = CatalogRef(uri=ref.uri, rows=300, fingerprint="c", n_errors=2, labelled=False)
    args: dict[str, Any] = {
        "summary": _comparison(),
        "features": feats,
        "catalog": catalog,
        "source": "/photos <&>",
        "stats": {"listed": 302, "embedded": 290, "duplicates": 10, "errors": 2},
        "skipped": {"not an image file": 9, "link loop": 1},
        "errors": ["/photos/a.jpg: empty file", "/photos/b.png: truncated"],
        "evaluation": {
            "duplicates": {"n_pairs": 13, "n_exact": 2, "threshold": 0.5},
            "quality_reason": "the collection carries no labels",
        },
        "pictures": {
            "samples": _picture(tmp_path / "s.png", 10),
            "results": _picture(tmp_path / "r.png", 20),
            "duplicates": None,
        },
    }
    args.update(kw)
    return render(**args)


def test_report_page_holds_what_the_artifacts_hold(tmp_path: Path) -> None:
    page = _page(tmp_path)
    text = re.sub(r"<[^>]+>", " ", page)
    assert "Verdict: PASSED" in text and "faiss vs sklearn: agree on 30 queries" in text
    assert "1 tied within the float32 bound" in text
    assert "random weights" in text and "weights = none" in text
    assert "STL-10 benchmark" in text  # the mode, as compare.json says
    assert "/photos &lt;&amp;&gt;" in page  # everything a user named is escaped
    assert "not an image file" in text and "link loop" in text  # skipped, by kind
    assert "/photos/a.jpg: empty file" in text and "First 2 of 2 images" in text
    assert "No retrieval quality" in text and "carries no labels" in text
    assert 'href="quality.json"' not in page and 'href="compare.json"' in page
    assert "12 of 13 near-duplicate pairs shown" in text
    # Pictures travel inside the page; nothing is fetched from anywhere.
    assert page.count('src="data:image/png;base64,') == 2
    assert not re.search(r"(src|href)=\"(https?:)?//", page)


def test_report_page_of_a_failed_collection_run(tmp_path: Path) -> None:
    summary = _comparison(failure="faiss disagrees with scikit-learn: 1 query")
    page = _page(
        tmp_path,
        summary=summary.model_copy(update={"mode": "collection", "n_queries": 300}),
        evaluation={"duplicates": {"n_pairs": 0, "threshold": 0.5}, "quality": None},
    )
    text = re.sub(r"<[^>]+>", " ", page)
    assert "Verdict: FAILED" in text and "faiss disagrees with scikit-learn" in text
    assert "Collection mode: every usable image (300) is in the index" in text
    assert "by searching every one of them, each left out of its own answer" in text
    assert "No near-duplicate pairs" in text
    # Skipped files: named by kind when the catalog pass recorded them, 'none' only when it
    # recorded none, and no claim at all when it did not record them.
    assert "passed over" not in re.sub(r"<[^>]+>", " ", _page(tmp_path, skipped=None))
    assert "passed over no files" in _page(tmp_path, skipped={})


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_report_html_after_a_run_renders_in_chromium(
    tmp_path: Path, reuse_random_resnet: None
) -> None:
    """A real run on a folder leaves report.html; Debian's Chromium opens it offline from the
    file and shows the verdict, the counts and the pictures (screenshot in
    test-artifacts/report/)."""
    from flows.image_search import image_search
    from tests.test_collection_flow import write_images
    from tests.test_quality import class_images
    from tests.test_service_page import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    images, labels = class_images(10, 2, size=64, seed=4)
    write_images(tmp_path / "photos", images, labels)
    (tmp_path / "photos" / "class0" / "broken.jpg").write_bytes(b"not a picture")
    out = tmp_path / "out"
    state = image_search(
        source=str(tmp_path / "photos"), out=str(out), weights="none", return_state=True
    )
    assert state.is_completed(), state.message
    report = Path(state.result()["report"])
    assert report == out / "report.html" and report.is_file()
    shots = Path(__file__).resolve().parents[1] / "test-artifacts" / "report"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.route("http*://**", lambda route: route.abort())  # offline: nothing may load
            page.goto(report.as_uri())
            text = page.inner_text("body")
            widths = page.eval_on_selector_all(
                "img", "imgs => Promise.all(imgs.map(i => i.decode().then(() => i.naturalWidth)))"
            )
            page.screenshot(path=str(shots / "report.png"), full_page=True)
        finally:
            browser.close()
    assert "Verdict: PASSED" in text
    assert "Collection mode: every usable image (20) is in the index" in text
    assert "random weights" in text
    assert "usable images" in text and "broken.jpg" in text  # the counts and the first error
    assert len(widths) == 3 and all(w > 0 for w in widths)  # duplicates, results, samples
    shot = np.asarray(Image.open(shots / "report.png").convert("L"))
    assert shot.shape[0] > 900 and shot.std() > 20  # a page with content, not a blank one
    assert (shot < 128).mean() > 0.01
