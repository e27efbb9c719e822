"""The built-in offline sample: real photographs cut into STL-10-format images.

scikit-learn ships two photographs (``china.jpg``, ``flower.jpg``). Cropping them at varied
offsets and scales gives thousands of 96×96 images where near neighbours are genuinely similar
(overlapping crops of the same scene), written in the exact STL-10 binary layout so the sample
goes through the same decode path as the real file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tasks.errors import ImageSearchError, param
from tasks.fingerprints import file_digest
from tasks.sources.cache import data_lock
from tasks.sources.stl10 import IMAGE_BYTES
from tasks.storage import atomic_path
from tasks.types import DataRef

SAMPLE_IMAGES = 2000
SAMPLE_VERSION = "v1"
SAMPLE_DIR = f"sample-{SAMPLE_VERSION}"
SAMPLE_FILE = "unlabeled_X.bin"


def _photographs() -> list[Image.Image]:
    """The photographs scikit-learn installs with itself, as RGB images (427×640)."""
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    return [Image.open(folder / name).convert("RGB") for name in ("china.jpg", "flower.jpg")]


def to_stl10_bytes(images: np.ndarray) -> bytes:
    """Encode NHWC uint8 images of shape (N, 96, 96, 3) in STL-10's layout.

    STL-10 stores each image channel by channel, each channel column-major; the decode view
    ``reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)`` is its own inverse permutation.
    """
    if images.ndim != 4 or images.shape[1:] != (96, 96, 3) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, 96, 96, 3), got {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def make_sample_images(n: int = SAMPLE_IMAGES, seed: int = 0) -> np.ndarray:
    """Deterministic 96×96 crops of the shipped photographs, shape (n, 96, 96, 3) uint8.

    Crop sides are log-uniform between 96 px and the photo's height; a quarter are mirrored.
    """
    rng = np.random.default_rng(seed)
    photos = _photographs()
    out = np.empty((n, 96, 96, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(np.exp(rng.uniform(np.log(96), np.log(min(w, h)))))
        x = int(rng.integers(0, w - side + 1))
        y = int(rng.integers(0, h - side + 1))
        crop = photo.crop((x, y, x + side, y + side)).resize((96, 96), Image.Resampling.BILINEAR)
        arr = np.asarray(crop, dtype=np.uint8)
        if rng.random() < 0.25:
            arr = arr[:, ::-1]
        out[i] = arr
    return out


def ensure_sample(data_dir: Path, n: int = SAMPLE_IMAGES) -> DataRef:
    """Write the sample into ``data_dir`` once (atomically) and return a reference to it."""
    target = data_dir / SAMPLE_DIR / SAMPLE_FILE
    # Under the cache's lock: runs started together write the sample once, not side by side.
    with data_lock(data_dir, (SAMPLE_DIR,)) as writable:
        if not target.exists() or target.stat().st_size != n * IMAGE_BYTES:
            if not writable:
                raise ImageSearchError(
                    f"Data cache {str(data_dir)!r} is read-only and holds no sample; choose a "
                    f"writable {param('data_dir')}."
                )
            with atomic_path(target) as tmp:
                tmp.write_bytes(to_stl10_bytes(make_sample_images(n)))
    return DataRef(uri=str(target), rows=n, fingerprint=f"sample-{file_digest(target)[:12]}")


LABELLED_DIR = f"sample-{SAMPLE_VERSION}-labelled"
BANDS = 5  # each photo is cut into 5 vertical bands; a band is a class
LABELLED_TRAIN, LABELLED_TEST = 50, 80  # per class: STL-10's 500 and 800, a tenth


def make_labelled_sample(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Crops labelled by where they come from: class = (photo, vertical band), 10 classes.

    Crops (side 64 px up to the band's width, resized to 96) stay inside their band, so
    images of a class overlap in content and those of different classes do not. Returns
    images (n, 96, 96, 3) uint8, labels (n,) uint8 1..10 (STL-10's coding), class names.
    """
    rng = np.random.default_rng(seed)
    photos = _photographs()
    names, images, labels = [], [], []
    for p, (photo, stem) in enumerate(zip(photos, ("china", "flower"), strict=True)):
        w, h = photo.size
        band = w // BANDS
        for b in range(BANDS):
            names.append(f"{stem}-{b + 1}")
            for _ in range(n_per_class):
                side = int(rng.integers(64, band + 1))
                x = b * band + int(rng.integers(0, band - side + 1))
                y = int(rng.integers(0, h - side + 1))
                crop = photo.crop((x, y, x + side, y + side))
                images.append(np.asarray(crop.resize((96, 96), Image.Resampling.BILINEAR)))
                labels.append(p * BANDS + b + 1)
    return np.stack(images).astype(np.uint8), np.asarray(labels, np.uint8), names


def ensure_labelled_sample(data_dir: Path) -> Path:
    """Write the labelled sample (STL-10's labelled layout: train_X/y.bin, test_X/y.bin,
    class_names.txt) into ``data_dir`` once and return its folder."""
    folder = data_dir / LABELLED_DIR
    with data_lock(data_dir, (LABELLED_DIR,)) as writable:
        if not (folder / "class_names.txt").is_file():
            if not writable:
                raise ImageSearchError(
                    f"Data cache {str(data_dir)!r} is read-only and holds no labelled sample; "
                    f"choose a writable {param('data_dir')}."
                )
            for name, n, seed in (("train", LABELLED_TRAIN, 1), ("test", LABELLED_TEST, 2)):
                images, labels, names = make_labelled_sample(n, seed)
                with atomic_path(folder / f"{name}_X.bin") as tmp:
                    tmp.write_bytes(to_stl10_bytes(images))
                with atomic_path(folder / f"{name}_y.bin") as tmp:
                    tmp.write_bytes(labels.tobytes())
            with atomic_path(folder / "class_names.txt") as tmp:  # written last: the marker
                tmp.write_text("\n".join(names) + "\n")
    return folder
