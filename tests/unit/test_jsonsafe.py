import json
import math

from app.jsonsafe import finite


def test_non_finite_floats_become_null_at_any_depth():
    raw = {"ci": (1.0, math.inf), "runs": [{"loss": math.nan}, {"loss": 2.5}], "n": 3, "name": "x", "t": -math.inf}
    safe = finite(raw)
    assert safe == {"ci": [1.0, None], "runs": [{"loss": None}, {"loss": 2.5}], "n": 3, "name": "x", "t": None}
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe
    assert raw["runs"][0]["loss"] != raw["runs"][0]["loss"]  # the input is left as it was (still NaN)
