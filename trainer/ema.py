"""Exponential moving average of the weights, updated with one foreach lerp per step."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """`ema ← ema + (1 - decay)·(θ - ema)` over every parameter, in fp32, on the model's device."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._ema_params = list(self.module.parameters())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [param.detach().float() for param in model.parameters()]
        torch._foreach_lerp_(self._ema_params, params, 1 - self.decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
