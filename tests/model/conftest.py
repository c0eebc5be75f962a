"""Fixtures for the model tests."""

from __future__ import annotations

import pytest
import torch
from model_helpers import TINY_PRESETS

from trainer.models import build_model


@pytest.fixture(params=TINY_PRESETS)
def tiny_model(request):
    torch.manual_seed(0)
    return build_model(request.param)
