"""Units of deft.evaluate's metrics that need no model: the 0-100 reward
scale and the win/tie/lose record."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit

from deft.evaluate import WinTieLose, reward_100, win_tie_lose


def testreward_100_is_100_sigmoid_without_overflow():
    s = [-1000.0, -30.0, -2.5, -1e-9, 0.0, 1e-9, 0.75, 4.0, 30.0, 1000.0]
    got = reward_100(s)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, 100.0 * expit(np.array(s)), rtol=1e-15, atol=0)
    assert got[4] == 50.0 and got[0] == 0.0 and got[-1] == 100.0
    # float32 input is computed in float64
    x32 = np.array([0.1, -3.3, 12.0], dtype=np.float32)
    np.testing.assert_array_equal(reward_100(x32), 100.0 * expit(x32.astype(np.float64)))


def test_win_tie_lose_record():
    w = win_tie_lose({"a": 60.0, "b": 50.5, "c": 40.0, "d": 70.0, "x": 1.0}, {"a": 50.0, "b": 50.0, "c": 50.0, "d": 70.0, "y": 3.0},
                     tie_margin=1.0, identical=["a"], baseline="base")
    assert w.to_dict() == {"baseline": "base", "n": 4, "win": 0, "tie": 3, "lose": 1, "win_rate": 0.0, "tie_rate": 0.75,
                           "lose_rate": 0.25, "tie_margin": 1.0, "only_in_run": 1, "only_in_baseline": 1}
    empty = WinTieLose("b", 0, 0, 0, 0.0).to_dict()
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in ("win_rate", "tie_rate", "lose_rate"))
    with pytest.raises(ValueError, match="tie_margin must be a finite number >= 0"):
        win_tie_lose({"a": 1.0}, {"a": 1.0}, tie_margin=float("inf"))
