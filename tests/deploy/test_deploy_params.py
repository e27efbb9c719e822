"""Per-run parameters of the deployments, on the real server the deployment tests share: the
run form holds one field per flow parameter with the flow's own bounds and descriptions, and a
run that overrides one parameter keeps the deployment's others."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from typing import Any

import pytest

from flows.image_search import image_search
from flows.params import SearchParams
from tests.deploy.conftest import Deployed
from tests.deploy.helpers import PREFECT, deployment_config, run_cli

pytestmark = pytest.mark.slow

DEPLOYMENTS = pytest.mark.parametrize(
    "name",
    ["gpu", "local", "photos"],
    # Not the bare word `gpu`: that is the marker of tests that need a GPU.
    ids=["gpu-deployment", "local-deployment", "photos-deployment"],
)


def _without(prop: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in prop.items() if k not in keys}


def _deployment(deployed: Deployed, name: str) -> dict[str, Any]:
    return deployed.server.get(f"/deployments/name/image-search/{name}")


def _delete_flow_run(deployed: Deployed, run_id: str) -> None:
    """Leave the server as the other deployment tests expect it: no runs of ours."""
    request = urllib.request.Request(
        f"{deployed.server.api_url}/flow_runs/{run_id}", method="DELETE"
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10):
        pass


@DEPLOYMENTS
def test_the_run_form_is_one_field_per_parameter(deployed: Deployed, name: str) -> None:
    """What `prefect deploy` built from the entrypoint: the model's fields, flat, each with
    its type, bounds, default and description; none required."""
    schema = _deployment(deployed, name)["parameter_openapi_schema"]
    model = SearchParams.model_json_schema()["properties"]
    assert list(schema["properties"]) == list(model)
    for field, prop in schema["properties"].items():
        assert _without(prop, "title", "position") == _without(model[field], "title"), field
    assert schema.get("required", []) == []


@DEPLOYMENTS
def test_deployment_parameters_are_flow_parameters(deployed: Deployed, name: str) -> None:
    """prefect.yaml's `parameters:` blocks name flow parameters, valid as they stand."""
    committed = deployment_config(name)["parameters"]
    assert _deployment(deployed, name)["parameters"] == committed
    assert set(committed) <= set(SearchParams.model_fields)
    SearchParams(**committed)


@DEPLOYMENTS
def test_a_run_overriding_k_keeps_the_deployments_other_parameters(
    deployed: Deployed, name: str
) -> None:
    defaults = _deployment(deployed, name)["parameters"]
    done = run_cli(
        [PREFECT, "deployment", "run", f"image-search/{name}", "--param", "k=5"],
        deployed.server.env(),
        deployed.checkout,
        timeout=120,
    )
    found = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
    assert found, done.stdout
    run = deployed.server.get(f"/flow_runs/{found.group(1)}")
    try:
        assert run["parameters"] == {**defaults, "k": 5}
        # The flow takes them as they are: no nested object, nothing missing or extra.
        checked = image_search.validate_parameters(run["parameters"])
        assert SearchParams(**checked) == SearchParams(**defaults, k=5)
    finally:
        _delete_flow_run(deployed, run["id"])
    if name == "local":
        assert (run["parameters"]["source"], run["parameters"]["weights"]) == ("sample", "none")
        assert run["parameters"]["limit"] == 300


def test_an_override_out_of_bounds_is_refused(deployed: Deployed) -> None:
    """The server checks a run's parameters against the form's bounds before it exists."""
    local = _deployment(deployed, "local")
    before = deployed.server.post("/flow_runs/filter", {})
    done = subprocess.run(
        [PREFECT, "deployment", "run", "image-search/local", "--param", "k=0"],
        env=deployed.server.env(),
        cwd=deployed.checkout,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = " ".join((done.stdout + done.stderr).split())  # as one line, however Rich wrapped it
    assert done.returncode != 0, output
    assert "Validation failed for field 'k'. Failure reason: 0 is less than the minimum of 1" in (
        output
    )
    after = deployed.server.post("/flow_runs/filter", {})
    assert [r for r in after if r["deployment_id"] == local["id"]] == [
        r for r in before if r["deployment_id"] == local["id"]
    ]
