"""Image preprocessing that matches the vision tower (geometry.image_preprocess_spec):
resize to size x size (bicubic, like SiglipImageProcessor), rescale to [0, 1], normalise."""

from __future__ import annotations

import numpy as np
import torch


def preprocess_images(images, spec: dict) -> torch.Tensor:
    """PIL images -> FloatTensor [N, 3, size, size]."""
    from PIL import Image

    size = int(spec["size"])
    mean = torch.tensor(spec["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(spec["std"], dtype=torch.float32)[:, None, None]
    out = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
        out.append((arr * float(spec["rescale"]) - mean) / std)
    if not out:
        return torch.zeros(0, 3, size, size)
    return torch.stack(out)
