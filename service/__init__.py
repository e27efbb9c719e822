"""The query service: ``image-search serve`` answers image queries over HTTP from one index."""
