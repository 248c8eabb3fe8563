"""``dask-kaas bench``: kaas against static allocation and plain Dask, in one run."""
