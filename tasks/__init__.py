"""The stages of image-search: pure functions plus one thin Prefect task per module."""
