"""Print the ``DaskCluster`` of GPU worker pods as YAML, rendered by dask-kubernetes'
``make_cluster_spec`` with the placement of the GPU job (:mod:`infra.dask.cluster`).

    python -m infra.dask.render --image REGISTRY/image-search:SHA [--set n_workers=4 ...]

Values of ``--set`` are JSON where they parse as JSON (numbers, lists, objects), else strings;
the same keys go into ``IMAGE_SEARCH_DASK_VARIABLES`` for ``--cluster kubernetes``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from infra.dask.cluster import DaskGpuVariables, render_cluster_spec
from tasks.errors import ImageSearchError

PLACEHOLDER_IMAGE = "REGISTRY/image-search:GIT_SHA"


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value is JSON where it parses, else a string."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ImageSearchError(f"--set {item!r}: expected KEY=VALUE, e.g. n_workers=4.")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    return values


def render_yaml(values: dict[str, Any]) -> str:
    """The DaskCluster for ``values`` (DaskGpuVariables fields) as one YAML document."""
    spec = render_cluster_spec(DaskGpuVariables.model_validate(values))
    return yaml.safe_dump(spec, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.dask.render", description=__doc__)
    parser.add_argument("--image", default=PLACEHOLDER_IMAGE, help="flow-run image of the run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        text = render_yaml({**parse_sets(args.set), "image": args.image})
    except (ImageSearchError, ValueError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
