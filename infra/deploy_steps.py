"""Deployment steps of ``prefect.yaml`` for the `gpu` deployment: name, build and push its image.

The image is ``$IMAGE_SEARCH_REGISTRY/image-search:<git sha>``. With ``IMAGE_SEARCH_BUILD_IMAGE=1``
these steps build it from infra/Dockerfile and push it with prefect-docker, so one command on a
machine with Docker builds, pushes and deploys a commit. Without the flag they only name the
image, which an earlier build of the same commit must have pushed; then ``prefect deploy`` needs
neither Docker nor prefect-docker. Without a registry there is no image a pod could pull, so the
deploy stops with the variable to set.
"""

from __future__ import annotations

from typing import Any

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
REGISTRY_EXAMPLE = "registry.cn-hangzhou.aliyuncs.com/your-namespace"


class DeployStepError(SystemExit):
    """A deployment that cannot work as configured: ``prefect deploy`` exits 1 with this message.

    A ``SystemExit`` because Prefect re-raises it as is, where any ``Exception`` from a step is
    wrapped and printed with two tracebacks before the message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"prefect deploy: error: {message}")


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
        raise DeployStepError(
            "IMAGE_SEARCH_BUILD_IMAGE is set but prefect-docker is not installed: "
            "pip install prefect-docker (and have a Docker engine), or unset "
            "IMAGE_SEARCH_BUILD_IMAGE to deploy an image that was already pushed."
        ) from exc
    return steps


def image_name_for(registry: str | None, repository: str) -> str:
    """``registry/repository``; refuses an empty registry with the variable to set."""
    registry = (registry or "").strip().rstrip("/")
    if not registry:
        raise DeployStepError(
            "IMAGE_SEARCH_REGISTRY is not set, so the gpu deployment would name the bare image "
            f"'{repository}', which no cluster can pull. Set it to the registry the cluster "
            f"pulls from (export IMAGE_SEARCH_REGISTRY={REGISTRY_EXAMPLE}), or deploy only the "
            "local deployment: prefect --no-prompt deploy --name local"
        )
    return f"{registry}/{repository}"


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
        raise DeployStepError(
            "the image tag is empty: the git-sha step found no commit. Deploy from a git "
            "checkout with at least one commit."
        )
    image_name = image_name_for(registry, repository)
    if not _wanted(build):
        print(
            f"Not building {image_name}:{tag} (IMAGE_SEARCH_BUILD_IMAGE is not set): the "
            "deployment uses that image, which must already be in the registry. To build and "
            "push it: IMAGE_SEARCH_BUILD_IMAGE=1 prefect --no-prompt deploy --name gpu"
        )
        return {
            "image_name": image_name,
            "tag": tag,
            "image": f"{image_name}:{tag}",
            "built": False,
        }
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
