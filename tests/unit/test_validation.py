import math

import numpy as np
import pytest

from kdistill import _validation as v


@pytest.mark.parametrize("bad", [True, False, "1", None, [1.0]], ids=repr)
def test_numbers_refuse_bools_and_non_numbers(bad):
    for check in (v.check_finite, v.check_positive, v.check_non_negative, v.check_unit_interval):
        with pytest.raises(TypeError, match="`x` must be a number"):
            check("x", bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=repr)
def test_numbers_refuse_non_finite(bad):
    for check in (v.check_finite, v.check_positive, v.check_non_negative, v.check_unit_interval):
        with pytest.raises(ValueError, match="`x` must be a finite number"):
            check("x", bad)


def test_bounds_and_normalization():
    assert v.check_positive("t", 2) == 2.0 and isinstance(v.check_positive("t", 2), float)
    assert v.check_positive("t", np.float32(0.5)) == 0.5
    with pytest.raises(ValueError, match=r"> 0 and at most 1e\+06, got 1e\+200"):
        v.check_positive("t", 1e200, max_value=v.MAX_SCALE)
    with pytest.raises(ValueError, match="> 0, got 0"):
        v.check_positive("t", 0)
    assert v.check_non_negative("w", 0) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        v.check_non_negative("w", -1e-9)
    assert v.check_unit_interval("b", 1) == 1.0
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        v.check_unit_interval("b", 1, open_low=True, open_high=True)
    with pytest.raises(ValueError, match="at most 10 in magnitude"):
        v.check_finite("f", -11, max_abs=10)


def test_int_bool_choice_list():
    assert v.check_int("k", np.int64(3), min_value=1) == 3
    for bad in (True, 3.0, "3"):
        with pytest.raises(TypeError, match="`k` must be an integer"):
            v.check_int("k", bad)
    with pytest.raises(ValueError, match="integer >= 1 and <= 4, got 5"):
        v.check_int("k", 5, min_value=1, max_value=4)
    assert v.check_bool("flag", False) is False
    with pytest.raises(TypeError, match="True or False"):
        v.check_bool("flag", 1)
    assert v.check_choice("r", "sum", ["sum", "mean"]) == "sum"
    with pytest.raises(ValueError, match=r"one of \['mean', 'sum'\], got 'avg'"):
        v.check_choice("r", "avg", ["sum", "mean"])
    assert v.check_float_list("w", (1, 0.5), non_negative=True) == [1.0, 0.5]
    with pytest.raises(ValueError, match=r"`w\[1\]` must be a finite number >= 0"):
        v.check_float_list("w", [1, -2], non_negative=True)
    with pytest.raises(TypeError, match="list of numbers"):
        v.check_float_list("w", "12")
    with pytest.raises(ValueError, match="between 1 and 10000"):
        v.check_float_list("w", [])
