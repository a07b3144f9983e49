"""JSON text that is always valid JSON: a non-finite float (a diverged perplexity) is written as null.

Python's json module writes NaN and Infinity, which no JSON parser accepts.
"""

import json
import math


def finite_json(obj):
    """`obj` with every NaN or infinite float replaced by None, in nested dicts, lists and tuples."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj, **options):
    """json.dumps of finite_json(obj): never a NaN or Infinity token."""
    return json.dumps(finite_json(obj), allow_nan=False, **options)
