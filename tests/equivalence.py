"""The check every equivalence test makes: a trainer's losses and final weights equal a
reference run's (single-device training, or a reference simulation) to float tolerance."""

import numpy as np

RTOL, ATOL = 1e-5, 1e-6


def assert_same_training(losses, weights, expected_losses, expected_weights):
    """Equal losses, the same variable names, and every weight equal to the reference's."""
    np.testing.assert_allclose(losses, expected_losses, rtol=RTOL, atol=ATOL)
    assert sorted(weights) == sorted(expected_weights)
    for name, value in expected_weights.items():
        np.testing.assert_allclose(weights[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
