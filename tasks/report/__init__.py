"""What a person looks at: picture grids, the samples preview, the report and its artifacts."""

from __future__ import annotations

import re


def artifact_key(name: str) -> str:
    """The key of artifact ``name`` for this run: prefixed with the deployment's name, so each
    deployment (``gpu``, ``local``, ...) keeps its own history in the UI; plain outside one."""
    from prefect.runtime import deployment

    owner = deployment.name
    if not owner:
        return name
    slug = re.sub(r"[^a-z0-9]+", "-", str(owner).lower()).strip("-")
    return f"{slug}-{name}" if slug else name
