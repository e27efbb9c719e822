"""The Dask cluster of GPU worker pods, rendered by dask-kubernetes' own code."""
