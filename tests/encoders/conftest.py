"""Real photos bundled with scikit-image, as the codecs expect them: (3, H, W) floats in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image


def photo(name: str, size: int) -> torch.Tensor:
    """Centre square crop of scikit-image's `name`, resized to size x size."""
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="session")
def photos_256() -> torch.Tensor:
    """astronaut, coffee, chelsea at 256 px: (3, 3, 256, 256)."""
    return torch.stack([photo(name, 256) for name in ("astronaut", "coffee", "chelsea")])
