"""The image-search flow, its parameters and its command line."""
