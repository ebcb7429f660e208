"""Shared test set-up: a fixed seed for every test (STYLE.md: seeds in an autouse fixture)."""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
