"""A tiny teacher for the end-to-end tests, loaded as ``e2e_models:tiny_resnet``.

Two heavy residual blocks dominate its latency, so skipping or pruning one is a clearly
measurable saving even on a busy machine (the budgets in the tests stay feasible).
"""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10, width: int = 48):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = Block(width)
        self.block2 = Block(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet()
