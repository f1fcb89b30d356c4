"""What ``bespoke run --preset tiny`` runs on: a tiny teacher, a narrower donor and a handful of
generated images, all built here, so every stage runs in about a minute on two CPU cores with
nothing to download or install beyond bespoke itself.

The weights are random (seeded), so the students' accuracy means nothing: the preset is for
trying a plugin end to end and for the documentation's examples, not for results. Each name is a
``package.module:attribute`` reference, the form the configuration accepts for models and data.
"""

from __future__ import annotations

from typing import Any

TEACHER = "bespoke.tiny:teacher"
DONOR = "bespoke.tiny:donor"
IMAGES = "bespoke.tiny:images"
INPUT_SIZE = 64


def teacher():
    """timm's ``test_efficientnet`` at twice its depth: residual blocks that skip and pruning can
    replace, and a latency of a few milliseconds."""
    return _test_efficientnet(seed=0, depth_multiplier=2.0)


def donor():
    """The same family at half the width: a cheaper piece for every stage of the teacher, at the
    same strides, as a real donor (e.g. Lite0 for Lite2) is."""
    return _test_efficientnet(seed=1, channel_multiplier=0.5)


def _test_efficientnet(seed: int, **kwargs: Any):
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", pretrained=False, **kwargs).eval()


def images(n: int = 24, size: int = 80) -> list:
    """``n`` RGB images of smooth colour gradients with a few rectangles (seeded): structure for
    the convolutions to respond to, unlike white noise. Unlabelled."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a = rng.uniform(-1, 1, (3, 3))
        img = np.stack([a[c, 0] * xx + a[c, 1] * yy + a[c, 2] for c in range(3)], axis=-1)
        for _ in range(3):
            x0, y0 = rng.integers(0, size - 8, 2)
            w, h = rng.integers(6, size // 2, 2)
            img[y0:y0 + h, x0:x0 + w] = rng.uniform(-1, 1, 3)
        img = (img - img.min()) / max(float(np.ptp(img)), 1e-6)
        out.append(Image.fromarray((img * 255).astype(np.uint8)))
    return out
