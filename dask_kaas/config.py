"""Dask configuration for dask_kaas (the ``kaas.*`` keys)."""

from __future__ import annotations

import os
from typing import Any

import dask
import yaml

_fn = os.path.join(os.path.dirname(__file__), "kaas.yaml")
with open(_fn) as f:
    defaults = yaml.safe_load(f)

dask.config.update_defaults(defaults)

CPU_DEFAULT_CAPACITY = 2**30
GPU_DEFAULT_FRACTION = 0.8


def get(key: str, default: Any = None) -> Any:
    return dask.config.get(f"kaas.{key}", default=default)


def parse_memory(value: Any, physical: int) -> int:
    """Bytes from an int, a string such as "64MB", or a fraction of ``physical``."""
    from dask.utils import parse_bytes

    from .graph.errors import KaasError

    if isinstance(value, bool):
        raise KaasError(f"bad memory size {value!r}")
    if isinstance(value, float) and 0 < value <= 1:
        return int(physical * value)
    if isinstance(value, (int, float)) and 1 < value < float("inf"):
        return int(value)
    if isinstance(value, str):
        try:
            if value.strip().endswith("%"):
                return int(physical * float(value.strip()[:-1]) / 100)
            return int(parse_bytes(value))
        except (ValueError, TypeError):
            pass
    raise KaasError(f"bad memory size {value!r}: use bytes, a string such as '8GB', or a "
                    "fraction between 0 and 1")
