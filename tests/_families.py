"""The timm families the partition and student tests run over (random weights, 64 px), cached.

ViT is built at 64 px through a callable, so that a saved student's recipe can rebuild it with
``bespoke.models.load_model("_families:vit_tiny_patch16_64")``.
"""

from __future__ import annotations

from functools import lru_cache

import timm
import torch

from bespoke.partition import Partition

FAMILIES = [
    "tf_efficientnet_lite0",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "resnet18",
    "resnet50",
    "regnetx_002",
    "convnext_atto",
    "vit_tiny_patch16_224",
]
SIZE = 64
INPUT_SHAPE = (1, 3, SIZE, SIZE)


def vit_tiny_patch16_64() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE)


def model_ref(name: str) -> str:
    """What a recipe names the teacher by (load_model must rebuild it at 64 px)."""
    return f"{__name__}:vit_tiny_patch16_64" if name.startswith("vit_") else name


@lru_cache(maxsize=None)
def teacher(name: str) -> Partition:
    """The partitioned teacher (shared between tests: never modify it in place)."""
    torch.manual_seed(0)
    if name.startswith("vit_"):
        model = vit_tiny_patch16_64()
    else:
        model = timm.create_model(name, pretrained=False)
    return Partition.from_model(model.eval(), INPUT_SHAPE, name=model_ref(name))


def example(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def skip_segment(part: Partition, max_len: int = 8):
    """A segment with compute whose input and output shapes match (a residual block), or None."""
    for seg in part.enumerate_segments(max_len):
        if seg.in_shape == seg.out_shape and seg.end - seg.start >= 2:
            return seg
    return None
