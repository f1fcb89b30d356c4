"""Tiny teacher + hand-assembled student for the fine-tuning, export and resume tests.

Used in-process and by the subprocess a resume test kills, so everything is deterministic.
"""

from __future__ import annotations

import torch
from torch import nn

from bespoke.partition import Partition


class TinyNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.b2(self.b1(self.stem(x)))
        return self.head(x.mean((2, 3)))


class HandStudent(nn.Module):
    """The teacher with the segment ``seg`` replaced by ``alt`` (what student.assemble does)."""

    def __init__(self, part: Partition, seg, alt: nn.Module):
        super().__init__()
        last = len(part.cut_points) - 1
        self.before = part.extract(part.segment(0, seg.start)) if seg.start > 0 else nn.Identity()
        self.alt = alt
        self.after = part.extract(part.segment(seg.end, last))
        self.seg_id = seg.id
        self.replaced_outputs: dict[str, torch.Tensor] = {}

    def forward(self, x):
        h = self.alt(self.before(x))
        self.replaced_outputs = {self.seg_id: h}
        return self.after(h)


def _cut(part: Partition, name: str) -> int:
    return next(cp.index for cp in part.cut_points if cp.name == name)


def make(seed: int = 0, size: int = 32):
    torch.manual_seed(seed)
    teacher = TinyNet().eval()
    part = Partition.from_model(teacher, (1, 3, size, size))
    seg = part.segment(_cut(part, "stem_2"), _cut(part, "b1_2"))  # block b1 -> a 1x1 conv
    alt = nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16), nn.ReLU())
    student = HandStudent(part, seg, alt)
    return teacher, part, student, seg


class ImageList(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, size: int = 32, labelled: bool = True, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g) if labelled else torch.full((n,), -1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])
