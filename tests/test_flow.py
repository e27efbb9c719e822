"""The real flow end to end on the built-in sample, on a temporary Prefect API."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID

import pyarrow.parquet as pq
import pytest

from flows.image_search import image_search
from flows.params import SearchParams
from tasks.common import ImageSearchError

pytestmark = pytest.mark.usefixtures("prefect_harness")

EXPECTED = {
    "samples.png",
    "split.parquet",
    "features",
    "neighbors.parquet",
    "compare.json",
    "results.png",
}


def artifact_keys(flow_run_id: UUID) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key for a in artifacts if a.key}


def test_flow_on_sample_end_to_end_and_rerun_is_free(tmp_path: Path) -> None:
    params = SearchParams(
        source="sample", weights="none", limit=300, out=str(tmp_path / "out"), batch_size=32
    )
    state = image_search(params, return_state=True)
    assert state.is_completed(), state.message
    outputs = state.result()
    out = tmp_path / "out"
    assert {Path(p).name for p in outputs.values()} == EXPECTED
    assert {p.name for p in out.iterdir()} >= EXPECTED
    compare = json.loads((out / "compare.json").read_text())
    assert compare["passed"] is True and compare["n_queries"] == 30 and compare["k"] == 3
    faiss = compare["backends"]["faiss"]
    assert faiss["max_abs_deviation"] < 1e-3 * faiss["median_neighbor_distance"]
    assert faiss["rows_mismatched"] == 0
    cuml = compare["backends"]["cuml"]
    assert cuml["available"] is False and cuml["reason"]
    neighbors = pq.read_table(out / "neighbors.parquet")
    assert neighbors.num_rows == 2 * 30 * 3
    assert pq.read_table(out / "features" / "index.parquet").num_rows == 270
    assert artifact_keys(state.state_details.flow_run_id) == {
        "samples",
        "features",
        "backends",
        "summary",
        "results",
    }
    # A second run with the same inputs rewrites nothing, yet shows the same artifacts.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = image_search(params, return_state=True)
    assert again.is_completed()
    assert [p.name for p, t in stamps.items() if p.stat().st_mtime_ns != t] == []
    assert {p for p in out.rglob("*") if p.is_file()} == set(stamps)
    assert artifact_keys(again.state_details.flow_run_id) == artifact_keys(
        state.state_details.flow_run_id
    )


def test_flow_fails_early_with_clear_message_for_k(tmp_path: Path) -> None:
    params = SearchParams(source="sample", weights="none", limit=20, k=19, out=str(tmp_path / "o"))
    state = image_search(params, return_state=True)
    assert state.is_failed()
    with pytest.raises(ImageSearchError, match="Expected k <= n_index, but n_index = 18, k = 19"):
        state.result()
    assert not (tmp_path / "o" / "features").exists()  # nothing expensive ran


def test_parameter_schema_describes_every_field() -> None:
    schema = image_search.parameters.model_dump()
    assert list(schema["properties"]) == ["params"]
    model = next(iter(schema["definitions"].values()))
    for name, prop in model["properties"].items():
        assert prop.get("description"), name
    assert model["properties"]["split_ratio"]["exclusiveMinimum"] == 0.0
    assert model["properties"]["k"]["minimum"] == 1
