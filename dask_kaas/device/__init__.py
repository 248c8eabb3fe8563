"""Device backends (CPU, CUDA), the DeviceCache, kernel cache and graph runtime."""
