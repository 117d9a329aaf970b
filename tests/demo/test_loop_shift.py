"""The demo loop's shifts and its labeller: every shift moves the inputs out of the reference's
range, and undoing it labels the shifted rows with the digit each was made from."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.demo.loop import field_shift
from edgefleet.demo.retrain import digits_oracle
from edgefleet.packager.examples import digits_split


@pytest.mark.parametrize("iteration", [1, 2])
def test_shift_is_undone_to_label_and_leaves_the_reference(iteration: int) -> None:
    split = digits_split()
    x, y = split.x_val[:200], split.y_val[:200]
    what, shift, inverse = field_shift(iteration)
    moved = shift(x)
    assert moved.dtype == np.float32 and what
    assert np.abs(moved - x).mean() > 0.2  # a real shift, not a no-op
    assert (digits_oracle(inverse(moved)) == y).mean() > 0.95
    assert (digits_oracle(x) == y).mean() > 0.95
