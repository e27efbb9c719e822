"""The approximate index trained and filled on a GPU: FAISS's GPU IVF-PQ (cuVS where FAISS was
built with it), imported lazily, the same index and file as on the CPU. Written against FAISS's
documented cloner and tested behind the ``gpu`` marker; not yet run on a GPU."""

from __future__ import annotations

from typing import Any


def gpu_count() -> int:
    """CUDA devices FAISS sees (0 without FAISS's GPU build)."""
    try:
        import faiss

        return int(faiss.get_num_gpus())
    except (ImportError, AttributeError):
        return 0


def to_gpu(index: Any, device: int = 0) -> Any:
    """The same index on a GPU (FAISS's GPU IVF-PQ, cuVS where FAISS was built with it), to
    train and add there; :func:`to_cpu` brings it back as the file's CPU index. Written
    against FAISS's documented cloner; not run here (no GPU)."""
    import faiss

    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = False  # float32 arithmetic, as the CPU index
    gpu: Any = faiss.index_cpu_to_gpu(resources, device, index, options)
    gpu.referenced_objects = [resources]  # the resources live as long as the index
    return gpu


def to_cpu(index: Any) -> Any:
    """A GPU index back on the CPU (what is saved and served)."""
    import faiss

    return faiss.index_gpu_to_cpu(index)
