"""Regenerate ``bespoke_latency_example/lut.json``: the demo table this example ships.

A real vendor runs ``bespoke profile HOUSE --plugin measured-latency -o lut.json`` on the board
instead; this script measures a few tiny demo modules so the example stays small and
self-contained (the tests build the same modules and find their entries).

    python examples/bespoke-latency-example/make_lut.py
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from bespoke.latency import ProfileItem, profile_modules, write_lut
from bespoke.plugins import load_registry

HERE = Path(__file__).resolve().parent
INPUT = (1, 3, 32, 32)


def demo_block(c_in: int, c_out: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def demo_items() -> tuple[list[ProfileItem], ProfileItem]:
    teacher = nn.Sequential(demo_block(3, 16), demo_block(16, 16), demo_block(16, 32, 2)).eval()
    items = [
        ProfileItem("segment 0-1", teacher[0], INPUT, "segment"),
        ProfileItem("segment 1-2", teacher[1], (1, 16, 32, 32), "segment"),
        ProfileItem("segment 1-2 skip", nn.Identity(), (1, 16, 32, 32), "alternative"),
        ProfileItem("segment 1-2 half", nn.Sequential(demo_block(16, 8), nn.Conv2d(8, 16, 1)), (1, 16, 32, 32), "alternative"),
        ProfileItem("segment 2-3", teacher[2], (1, 16, 32, 32), "segment"),
    ]
    return items, ProfileItem("demo teacher", teacher, INPUT, "teacher")


def main() -> None:
    est = load_registry().instantiate("measured-latency", {"device_name": "Example Board (demo figures)", "runs": 30})
    items, teacher = demo_items()
    table = profile_modules(items, est, teacher=teacher, notes={"made_by": "examples/bespoke-latency-example/make_lut.py"})
    print(write_lut(table, HERE / "bespoke_latency_example" / "lut.json"))


if __name__ == "__main__":
    main()
