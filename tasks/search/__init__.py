"""Exact nearest-neighbour search: the backends, the blocked CPU kernel and the certified
reduced-precision path."""
