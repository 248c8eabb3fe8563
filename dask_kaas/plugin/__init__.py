"""The Dask integration: scheduler and worker plugins, placement, fair share."""
