"""The real flow end to end on the built-in sample, on a temporary Prefect API."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pyarrow.parquet as pq
import pytest

from flows.image_search import image_search
from flows.params import DEFAULTS, SearchParams
from tasks.errors import ImageSearchError, option_name

pytestmark = pytest.mark.usefixtures("prefect_harness")

EXPECTED = {
    "catalog.parquet",
    "errors.parquet",
    "duplicates.parquet",
    "duplicates.png",
    "samples.png",
    "split.parquet",
    "features",
    "neighbors.parquet",
    "compare.json",
    "results.png",
    "report.html",
}


def artifact_keys(flow_run_id: UUID) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key for a in artifacts if a.key}


def test_flow_on_sample_end_to_end_and_rerun_is_free(
    tmp_path: Path, reuse_random_resnet: None
) -> None:
    params = SearchParams(
        source="sample", weights="none", limit=300, out=str(tmp_path / "out"), batch_size=32
    )
    state = image_search(**params.model_dump(), return_state=True)
    assert state.is_completed(), state.message
    outputs = state.result()
    out = tmp_path / "out"
    assert {Path(p).name for p in outputs.values()} == EXPECTED
    assert list(outputs)[-1] == "report"  # printed last by the command line
    assert {p.name for p in out.iterdir()} >= EXPECTED
    compare = json.loads((out / "compare.json").read_text(), parse_constant=_no_constant)
    assert compare["passed"] is True and compare["n_queries"] == 30 and compare["k"] == 3
    assert compare["mode"] == "benchmark"  # the sample is STL-10: the seed's 9:1 split
    page = (out / "report.html").read_text()
    assert "STL-10 benchmark" in page and "Verdict: PASSED" in page
    assert "random weights" in page
    faiss = compare["backends"]["faiss"]["agreement"]
    assert faiss["max_abs_deviation"] < 1e-3 * faiss["median_neighbor_distance"]
    assert faiss["rows_mismatched"] == 0
    cuml = compare["backends"]["cuml"]
    assert cuml["available"] is False and cuml["reason"]
    neighbors = pq.read_table(out / "neighbors.parquet")
    assert neighbors.num_rows == 2 * 30 * 3
    assert pq.read_table(out / "features" / "index.parquet").num_rows == 270
    # The terminal and the UI both read the run's log: it says the weights are random, as a
    # warning, not buried among INFO lines.
    logs = flow_run_logs(state.state_details.flow_run_id)
    warned = [log for log in logs if "random weights" in log.message]
    assert warned and warned[0].level >= 30
    assert "not meaningful image descriptors" in warned[0].message
    assert artifact_keys(state.state_details.flow_run_id) == {
        "catalog",
        "duplicates",
        "samples",
        "features",
        "backends",
        "summary",
        "results",
    }
    # A second run with the same inputs rewrites nothing, yet shows the same artifacts.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = image_search(**params.model_dump(), return_state=True)
    assert again.is_completed()
    assert [p.name for p, t in stamps.items() if p.stat().st_mtime_ns != t] == []
    assert {p for p in out.rglob("*") if p.is_file()} == set(stamps)
    assert artifact_keys(again.state_details.flow_run_id) == artifact_keys(
        state.state_details.flow_run_id
    )


def _no_constant(name: str) -> None:
    raise AssertionError(f"compare.json holds {name}: not valid JSON")


def flow_run_logs(flow_run_id: UUID, until: str = "Finished in state") -> list[Any]:
    """The run's logs (its tasks' included) as the UI reads them, once ``until`` arrived."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            if any(until in log.message for log in logs) or time.monotonic() > deadline:
                return logs
            time.sleep(0.2)


def test_flow_fails_early_with_clear_message_for_k(tmp_path: Path) -> None:
    state = image_search(
        source="sample", weights="none", limit=20, k=19, out=str(tmp_path / "o"), return_state=True
    )
    assert state.is_failed()
    with pytest.raises(ImageSearchError, match="Expected k <= n_index, but n_index = 18, k = 19"):
        state.result()
    assert not (tmp_path / "o" / "features").exists()  # nothing expensive ran


def test_user_error_ends_the_run_failed_with_the_message_alone(tmp_path: Path) -> None:
    """A run from the UI or a deployment: the state message is the error itself, naming the
    form's fields, and the run's log holds no traceback."""
    missing = tmp_path / "missing"
    state = image_search(source=str(missing), out=str(tmp_path / "o"), return_state=True)
    assert state.is_failed()
    assert state.message is not None
    assert state.message.startswith(f"Source '{missing}' is neither a URL")
    assert state.message.endswith(", or source sample.")
    logs = flow_run_logs(state.state_details.flow_run_id, until=state.message)
    assert any(state.message in log.message for log in logs), [log.message for log in logs]
    tracebacks = [log.message for log in logs if "Traceback" in log.message]
    assert tracebacks == []


def test_command_line_runs_name_options(tmp_path: Path) -> None:
    """The run's record names form fields; the error it hands back still knows its settings,
    so the command line words them as options."""
    missing = tmp_path / "missing"
    state = image_search(source=str(missing), out=str(tmp_path / "o"), return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ImageSearchError)
    assert error.worded(option_name).endswith(", or --source sample.")


def test_a_real_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.image_search

    def broken(names: Any) -> Any:
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(flows.image_search, "choose_backends", broken)
    state = image_search(source="sample", out=str(tmp_path / "o"), return_state=True)
    assert state.is_failed()
    with pytest.raises(KeyError, match="a bug, not a user error"):
        state.result()
    logs = flow_run_logs(state.state_details.flow_run_id, until="a bug, not a user error")
    assert any("Traceback" in log.message and "KeyError" in log.message for log in logs)


def test_overlapping_folders_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    """An explicit data_dir inside the output folder, and the default data cache
    ($IMAGE_SEARCH_DATA) holding it: both end the run at once, naming the form's fields."""
    out = tmp_path / "out"
    state = image_search(source="sample", out=str(out), data_dir=str(out / "d"), return_state=True)
    assert state.is_failed()
    assert state.message == (
        f"invalid parameters:\n  The output folder {out} (out) holds the data cache {out / 'd'} "
        f"(data_dir); choose two separate folders."
    )
    cache = Path(os.environ["IMAGE_SEARCH_DATA"])
    state = image_search(source="sample", out=str(cache / "out"), return_state=True)
    assert state.is_failed()
    assert state.message is not None
    assert state.message.startswith(
        f"The output folder {cache / 'out'} (out) lies inside the data cache {cache} (data_dir)"
    )
    assert "$IMAGE_SEARCH_DATA" in state.message
    assert not out.exists() and not (cache / "out").exists()


def test_parameter_schema_is_flat_bounded_and_described() -> None:
    """One form field per parameter, so a run overrides one and keeps the rest."""
    schema = image_search.parameters.model_dump()
    assert list(schema["properties"]) == list(SearchParams.model_fields)
    for name, prop in schema["properties"].items():
        assert prop["description"] == SearchParams.model_fields[name].description, name
        assert prop["default"] == getattr(DEFAULTS, name), name
    assert schema["properties"]["split_ratio"]["exclusiveMinimum"] == 0
    assert schema["properties"]["split_ratio"]["exclusiveMaximum"] == 1
    assert schema["properties"]["k"]["minimum"] == 1
    assert schema["properties"]["k"]["maximum"] == 1000
    assert schema["required"] == []
