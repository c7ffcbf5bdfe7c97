"""Settings for the whole test session (tests/data/conftest.py adds the data sets' fixtures)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread for every in-process test, as the CLI subprocess tests use (``OMP_NUM_THREADS=1``).

    The tests' tensors are small, so a second thread gains little; and on a 2-core machine shared with other jobs
    multi-threaded LAPACK stalls: a 512-wide float64 ``eigh`` took 2-4 s on two threads against 0.04-0.06 s on one
    (measured under a load average of 7). Tests that need threads set their own (`torch.set_num_threads`)."""
    import torch

    torch.set_num_threads(1)
