"""Where images come from: the registry of source kinds (:mod:`tasks.sources.collection`: your
folders, archives and lists, or STL-10 in any of its forms), the one HTTP client, and the one
decode rule; STL-10 fetched, checked and cached."""
