"""Deployment of image-search: work-pool template, image, manifests, prefect.yaml steps."""
