"""Shared test set-up: the Triton interpreter on CPU machines, and a fixed seed for every test."""

import os
import random

import torch

# Triton fixes interpreted vs compiled when it is first imported (its own tl.sum/tl.topk included),
# so on a machine without CUDA the interpreter is switched on here, before any test module
# imports triton. The AOT audit compiles in a subprocess with the variable unset.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
