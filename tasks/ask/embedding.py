"""The model that embeds queries exactly as the index's images were embedded: the settings in
the index's metadata, checked to give this installation's model key, run by the index's exported
model (onnxruntime, loaded in a fraction of a second) when it has a current one, else built in
TensorFlow (seconds; imported only then)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import ImageSearchError, param
from tasks.features.model import DIM, PREPROCESSING
from tasks.sources.images import RESIZE_RULE
from tasks.types import ModelSpec

log = logging.getLogger(__name__)

MODEL = "keras.applications.ResNet50"
Forward = Callable[[np.ndarray], np.ndarray]
"""A forward pass: (B, S, S, 3) uint8 -> (B, 2048) float32."""


def _same_weights(given: str, recorded: str) -> bool:
    if given == recorded:
        return True
    if given in ("imagenet", "none") or recorded in ("imagenet", "none"):
        return False
    return Path(given).expanduser().resolve() == Path(recorded).expanduser().resolve()


def model_spec(meta: dict[str, Any], weights: str | None = None) -> ModelSpec:
    """The model that embeds queries like the index's images: the settings in the index's
    metadata, checked to give this installation's key for them.

    ``weights``: what the user asked for, refused when it is not what built the index. Raises
    ImageSearchError naming what differs.
    """
    recorded = meta.get("weights")
    if not recorded or "input_size" not in meta or "model_key" not in meta:
        raise ImageSearchError(
            "The index's features carry no model description (weights, input size, model key); "
            "run `image-search run` on the collection again to rebuild them."
        )
    if weights is not None and not _same_weights(weights, str(recorded)):
        raise ImageSearchError(
            f"{param('weights')} {weights} differs from the weights the index was built with "
            f"({recorded}); leave {param('weights')} out to use the index's own, or rebuild the "
            f"index with {param('weights')} {weights}."
        )
    differs = [
        f"{name} {meta.get(key)!r} (here: {ours!r})"
        for name, key, ours in (
            ("model", "model", MODEL),
            ("pooling", "pooling", "max"),
            ("dimension", "dim", DIM),
            ("preprocessing", "preprocessing", PREPROCESSING),
            ("resize rule", "resize", RESIZE_RULE),
        )
        if key in meta and meta[key] != ours
    ]
    if differs:
        raise ImageSearchError(
            "The index was built with another model: " + "; ".join(differs) + ". Rebuild it "
            "with this version of image-search (`image-search run` on the same collection)."
        )
    spec = ModelSpec(
        weights=str(recorded),
        seed=int(meta.get("seed", 0)),
        precision=str(meta.get("precision", "float32")),
        input_size=int(meta["input_size"]),
    )
    key = spec.key()  # hashes the weights file: a missing one is named here
    if key != meta["model_key"]:
        raise ImageSearchError(
            f"The index was built with model key {meta['model_key']}, but weights "
            f"{spec.weights!r} (seed {spec.seed}, {spec.precision}, input size "
            f"{spec.input_size}) give {key} here: the weights file's content or image-search's "
            f"model or resize code changed since. Rebuild the index with `image-search run` on "
            f"the same collection, or query with the weights and version that built it."
        )
    return spec


def lazy(make: Callable[[], Forward]) -> Forward:
    """A forward pass made by ``make`` on its first call: no model is loaded for queries that
    all fail before embedding."""
    made: list[Forward] = []

    def call(batch: np.ndarray) -> np.ndarray:
        if not made:
            made.append(make())
        return made[0](batch)

    return call


def load_forward(spec: ModelSpec, exported: Path | None = None) -> Forward:
    """The forward pass of ``spec``'s model: the exported one at ``exported`` (the index's own,
    see :attr:`tasks.ask.index.Index.model_file`), else ResNet50 built in TensorFlow."""
    if exported is not None and spec.precision == "float32":
        from tasks.features.exported import load

        try:
            forward = load(exported)
        except ImportError as exc:
            log.info("onnxruntime is not installed (%s): building the model in TensorFlow", exc)
        else:
            log.info("embedding queries with the index's exported model (onnxruntime, CPU)")
            return forward
    from tasks.features.model import build_model, configure_gpu_memory, make_forward

    device = configure_gpu_memory(spec.gpu_memory_fraction)
    model, _ = build_model(spec.weights, spec.seed, spec.precision)
    log.info("embedding queries with ResNet50 in TensorFlow: %s", device)
    return make_forward(model)
