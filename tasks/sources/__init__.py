"""Where images come from: STL-10 in any of its forms (URL, tarball, folder, .bin) or the
built-in sample, fetched, checked, cached and decoded."""
