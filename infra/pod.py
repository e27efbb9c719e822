"""The GPU pod's shape, defined once: the variables of the Kubernetes work pool's base job template
(``work-pool-kubernetes.json``). Flow-run pods get it from the pool; Dask worker pods read the same
defaults here, so a change to the template moves both."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

TEMPLATE = "work-pool-kubernetes.json"


@cache
def base_job_template() -> dict[str, Any]:
    """The work pool's base job template (``job_configuration`` and ``variables``)."""
    text = resources.files(__package__ or "infra").joinpath(TEMPLATE).read_text()
    template: dict[str, Any] = json.loads(text)
    return template


def job_defaults() -> dict[str, Any]:
    """Every template variable's default (None where it has none), by variable name."""
    properties = base_job_template()["variables"]["properties"]
    return {name: spec.get("default") for name, spec in properties.items()}
