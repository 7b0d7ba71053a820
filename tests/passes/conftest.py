import numpy as np
import pytest


@pytest.fixture(scope="session")
def token_windows() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 64, 24) for _ in range(4)]
