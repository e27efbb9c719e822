"""Shared fixtures: a sealed environment (no traffic off 127.0.0.1, caches in tmp), generated
STL-10 files and tarballs, and a local HTTP server with Range support that misbehaves on
command."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from tasks.sources.sample import to_stl10_bytes
from tests.http_server import MisbehavingServer
from tests.indexes import Built, build_index, describe, write_images

# Before anything imports Prefect or TensorFlow: keep every byte on this machine.
os.environ.update(
    {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
)


# Fixtures that start a process or a server (a Prefect API, a Dask cluster, an S3 server, the
# HTTP service): a test that uses one is `slow`, wherever it is, so the quick loop
# (-m "not slow and not e2e") starts none of them.
SLOW_FIXTURES = frozenset(
    {"prefect_harness", "dask_address", "sharded_and_numpy", "s3_server", "service"}
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs a process or a server `slow`; skip `gpu` tests, with the
    reason, where no CUDA device and RAPIDS are present."""
    from tasks.search.backends import CumlBackend

    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    reason = CumlBackend().unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU with cuML/cuDF: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_caches(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test gets its own data cache and Keras home, never the user's."""
    base = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("IMAGE_SEARCH_DATA", str(base / "data"))
    monkeypatch.setenv("KERAS_HOME", str(base / "keras"))


def pattern_images(n: int, seed: int = 0) -> np.ndarray:
    """Random NHWC uint8 images of shape (n, 96, 96, 3)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)


@dataclass
class FakeStl10:
    """A generated STL-10 tarball and the MD5 sums that go with it."""

    tarball: bytes
    images: np.ndarray
    unlabeled: bytes = field(repr=False)

    @property
    def tar_md5(self) -> str:
        return hashlib.md5(self.tarball).hexdigest()

    @property
    def bin_md5(self) -> str:
        return hashlib.md5(self.unlabeled).hexdigest()

    def checksums(self):  # type: ignore[no-untyped-def]
        from tasks.sources.stl10 import Checksums

        return Checksums(tarball=self.tar_md5, members={"unlabeled_X.bin": self.bin_md5})


def make_tarball(members: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """A gzip tarball with ``members`` (name -> bytes) and optional raw (e.g. link) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return buf.getvalue()


def make_fake_stl10(n: int = 40, seed: int = 0) -> FakeStl10:
    """An archive laid out like stl10_binary.tar.gz holding ``n`` random images."""
    images = pattern_images(n, seed)
    unlabeled = to_stl10_bytes(images)
    tarball = make_tarball(
        {
            "stl10_binary/class_names.txt": b"airplane\nbird\n",
            "stl10_binary/train_y.bin": bytes([1, 2, 3]),
            "stl10_binary/unlabeled_X.bin": unlabeled,
        }
    )
    return FakeStl10(tarball=tarball, images=images, unlabeled=unlabeled)


@pytest.fixture(scope="session")
def fake_stl10() -> FakeStl10:
    return make_fake_stl10()


@pytest.fixture
def http_server() -> Iterator[MisbehavingServer]:
    with MisbehavingServer() as server:
        yield server


@pytest.fixture(scope="session")
def random_resnet() -> Any:
    """One ResNet50 with seeded random weights (seed 0) for every test that needs the model
    itself rather than the building of it (a build takes seconds)."""
    from tasks.features.model import build_model

    return build_model("none", seed=0)


@pytest.fixture
def reuse_random_resnet(random_resnet: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the embed stage use the session's model for ``weights='none', seed=0``."""
    import tasks.features.embed

    original = tasks.features.embed.build_model

    def build(weights: str, seed: int = 0, precision: str = "float32") -> Any:
        if (weights, seed, precision) == ("none", 0, "float32"):
            return random_resnet
        return original(weights, seed, precision)

    monkeypatch.setattr(tasks.features.embed, "build_model", build)


@pytest.fixture(scope="session")
def random_forward(random_resnet: Any) -> Any:
    """The batch run's forward pass (TensorFlow) of the session's random ResNet50."""
    from tasks.features.model import make_forward

    return make_forward(random_resnet[0])


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, random_resnet: Any) -> Built:
    """One index of 24 generated images for the session, built by the batch run's stages with
    the session's model; tests that change it work on a copy."""
    base = tmp_path_factory.mktemp("query-index")
    write_images(base / "images", 24)
    build_index(base / "images", base / "out", random_resnet)
    return Built(base / "images", base / "out", describe(base / "out"))


@pytest.fixture(scope="session")
def index(built: Built) -> Built:
    """The shared index by the name the service tests use."""
    return built


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API (SQLite in tmp) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
