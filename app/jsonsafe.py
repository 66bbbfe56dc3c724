"""Strict JSON from results that may hold NaN or ±inf (an unbounded bootstrap end, an infinite threshold)."""

from __future__ import annotations

import math
from typing import Any


def finite(obj: Any) -> Any:
    """A copy in which every non-finite float, in dicts, lists and tuples at any depth, is None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
