"""Values read from untrusted metadata: numbers, JSON, and filling the normalised dictionary.

Every reader in this package returns what it could understand and never raises on a malformed value;
these helpers turn what does not fit into None.
"""

from __future__ import annotations

import json
import math
from typing import Any


def number(value: Any, kind: type) -> Any:
    """int/float from a str or a number; None when it is not one (or is not finite)."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return None
    try:
        result = float(value) if kind is float else int(str(value).strip())
    except (TypeError, ValueError, OverflowError):
        if kind is int:
            try:
                as_float = float(value)
            except (TypeError, ValueError):
                return None
            return int(as_float) if as_float.is_integer() else None
        return None
    if isinstance(result, float) and not math.isfinite(result):
        return None
    return result


def loads(text: Any) -> Any:
    """json.loads that returns None for anything that is not JSON (including absurdly deep nesting)."""
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def put(out: dict[str, Any], key: str, value: Any) -> None:
    """out[key] = value, unless the value is None or empty."""
    if value is not None and value != "":
        out[key] = value

