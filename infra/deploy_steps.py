"""Deployment steps of ``prefect.yaml``: build and push the flow-run image, only when asked.

``prefect deploy`` runs every build step of every deployment it deploys and has no switch to skip
one, so the image build is gated here: with ``IMAGE_SEARCH_BUILD_IMAGE=1`` (CI with Docker) these
steps call prefect-docker's ``build_docker_image`` / ``push_docker_image``; otherwise they only
name the image of the current commit, which CI built and pushed, and ``prefect deploy --all``
works on any machine with git, without Docker or prefect-docker.
"""

from __future__ import annotations

from typing import Any

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def _wanted(flag: str | bool | None) -> bool:
    """Whether a step flag (usually a templated environment variable) says yes."""
    if isinstance(flag, bool):
        return flag
    return (flag or "").strip().lower() in TRUE_WORDS


def _prefect_docker() -> Any:
    """prefect-docker's deployment steps, or an error that says how to get them."""
    try:
        from prefect_docker.deployments import steps
    except ImportError as exc:
        raise RuntimeError(
            "IMAGE_SEARCH_BUILD_IMAGE is set but prefect-docker is not installed: "
            "pip install prefect-docker (and have a Docker engine), or unset it to deploy "
            "the image CI pushed."
        ) from exc
    return steps


def image_name_for(registry: str | None, repository: str) -> str:
    """``registry/repository``, or the bare repository when no registry is given."""
    registry = (registry or "").strip().rstrip("/")
    return f"{registry}/{repository}" if registry else repository


def build_image(
    repository: str,
    tag: str,
    registry: str | None = None,
    dockerfile: str = "infra/Dockerfile",
    build: str | bool | None = None,
    platform: str = "linux/amd64",
) -> dict[str, Any]:
    """Name (and with ``build`` set, build) the image ``registry/repository:tag``.

    Returns prefect-docker's step output (``image_name``, ``tag``, ``image``, ...) plus ``built``.
    """
    tag = tag.strip()
    if not tag:
        raise ValueError("tag is empty: the git-sha step must run first (is this a git checkout?)")
    image_name = image_name_for(registry, repository)
    if not _wanted(build):
        print(
            f"Not building {image_name}:{tag} (IMAGE_SEARCH_BUILD_IMAGE is not set): "
            "the deployment uses the image CI pushed for this commit."
        )
        return {
            "image_name": image_name,
            "tag": tag,
            "image": f"{image_name}:{tag}",
            "built": False,
        }
    if not (registry or "").strip():
        raise ValueError(
            "IMAGE_SEARCH_BUILD_IMAGE is set but IMAGE_SEARCH_REGISTRY is empty: a pod cannot pull "
            "an image without a registry. Set IMAGE_SEARCH_REGISTRY, e.g. "
            "registry.cn-hangzhou.aliyuncs.com/your-namespace."
        )
    build_docker_image = _prefect_docker().build_docker_image
    result = dict(
        build_docker_image(image_name=image_name, tag=tag, dockerfile=dockerfile, platform=platform)
    )
    result["built"] = True
    return result


def push_image(image_name: str, tag: str, built: str | bool | None = None) -> dict[str, Any]:
    """Push the image ``build_image`` built; nothing to do when it did not build one."""
    if not _wanted(built):
        return {"image_name": image_name, "tag": tag, "pushed": False}
    push_docker_image = _prefect_docker().push_docker_image
    result = dict(push_docker_image(image_name=image_name, tag=tag))
    result["pushed"] = True
    return result
