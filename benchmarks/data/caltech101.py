"""Caltech-101 as a user's own task: a seeded, stratified split into train, selection and test.

    python benchmarks/data/caltech101.py --images DIR/101_ObjectCategories --out DIR/caltech101-split

Where the images come from: the public repository ``MachineLearning2020/Homework2-Caltech101``
holds Caltech-101 (Fei-Fei, Fergus and Perona, 2004; ``101_ObjectCategories/<class>/*.jpg``).
Bring a snapshot of it and unpack the folder, for example::

    git clone https://github.com/MachineLearning2020/Homework2-Caltech101 caltech
    git -C caltech archive HEAD 101_ObjectCategories | tar -x -C DIR

The images are never copied into the project: the split is a folder of symbolic links to them.

The split (seeded, stratified per class, ``BACKGROUND_Google`` and ``Faces_easy`` left out: the
first is clutter, not a class; the second near-copies ``Faces``):

- ``test/<class>/``: about 48 % of each class (about 4,000 images in all), for scoring only,
  touched once at the end of a benchmark: a paired 95 % interval is then about +-1 point;
- ``selection/<class>/``: 10 % of the rest (about 420), held out from training for everything
  that chooses (early stopping, re-ranking, the pick, keep-best);
- ``train/<class>/``: the rest (about 3,800), the labelled training images;
- ``pool/``: the same training images as one flat folder (no labels): the unlabelled images a
  user hands to ``bespoke run --data``.

A few photos appear twice in Caltech-101: a copy of a training image (the same file, bytes or
pixels, by the rule ``bespoke run`` checks its roles with) is taken out of ``selection/``, and a
copy of a training or selection image out of ``test/``; ``train/`` stays as drawn (3 and 14
images with seed 0: selection 418, test 3,984). ``split.json`` records the counts per class and
role, the files taken out, and digests of the file lists (``drawn``: before copies were taken
out; a second run into the same ``--out`` must draw the same split).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bespoke.roles import shared_images  # noqa: E402

LEFT_OUT = ("BACKGROUND_Google", "Faces_easy")
SUFFIXES = {".jpg", ".jpeg", ".png"}
SOURCE = "github.com/MachineLearning2020/Homework2-Caltech101 (101_ObjectCategories)"


def split(images: Path, seed: int = 0, test: float = 0.485, selection: float = 0.1
          ) -> dict[str, dict[str, list[Path]]]:
    """``{role: {class: [files]}}``, stratified per class and seeded."""
    classes = sorted(p.name for p in images.iterdir() if p.is_dir() and p.name not in LEFT_OUT)
    if not classes:
        raise SystemExit(f"{images}: no class folders (expected 101_ObjectCategories/<class>/*.jpg)")
    roles: dict[str, dict[str, list[Path]]] = {"train": {}, "selection": {}, "test": {}}
    for c in classes:
        files = sorted(p for p in (images / c).iterdir() if p.suffix.lower() in SUFFIXES)
        random.Random(f"{seed}:{c}").shuffle(files)
        n_test = round(test * len(files))
        rest = files[n_test:]
        n_sel = max(1, round(selection * len(rest)))
        roles["test"][c] = sorted(files[:n_test])
        roles["selection"][c] = sorted(rest[:n_sel])
        roles["train"][c] = sorted(rest[n_sel:])
    return roles


def drop_copies(out: Path, roles: dict[str, dict[str, list[Path]]]) -> dict[str, list[str]]:
    """Caltech-101 holds a few copies of the same photo within a class: take out of ``selection``
    every image that is one of ``train`` (the same file, bytes or pixels, by the rule a
    ``bespoke run`` checks its roles with: ``bespoke.roles.shared_images``), and out of ``test``
    every one that is one of ``train`` or ``selection``; ``train`` stays as drawn. Removes their
    links under ``out`` and from ``roles``; returns the files taken out, by role."""
    from bespoke.data import open_images

    dropped: dict[str, list[str]] = {}
    for role, against in (("selection", ["train"]), ("test", ["train", "selection"])):
        copies = {Path(q).resolve() for other in against
                  for _, q, _ in shared_images(open_images(str(out / other)), open_images(str(out / role)))}
        for c, files in roles[role].items():
            for f in files:
                if f.resolve() in copies:
                    (out / role / c / f.name).unlink()
            roles[role][c] = [f for f in files if f.resolve() not in copies]
        dropped[role] = sorted(str(p) for p in copies)
    return dropped


def digest_of(roles: dict[str, dict[str, list[Path]]]) -> str:
    h = hashlib.sha256()
    for role, by_class in roles.items():
        for c, files in by_class.items():
            for f in files:
                h.update(f"{role}/{c}/{f.name}\n".encode())
    return h.hexdigest()


def write(roles: dict[str, dict[str, list[Path]]], out: Path, dropped: dict[str, list[str]] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for role, by_class in roles.items():
        for c, files in by_class.items():
            folder = out / role / c
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                link = folder / f.name
                if not link.is_symlink():
                    os.symlink(f.resolve(), link)
    pool = out / "pool"
    pool.mkdir(exist_ok=True)
    for c, files in roles["train"].items():
        for f in files:
            link = pool / f"{c}_{f.name}"
            if not link.is_symlink():
                os.symlink(f.resolve(), link)
    record = {"source": SOURCE, "left_out": list(LEFT_OUT), "classes": len(roles["train"]),
              "counts": {r: sum(len(v) for v in by.values()) for r, by in roles.items()},
              "per_class": {c: {r: len(roles[r][c]) for r in roles} for c in roles["train"]},
              "digest": digest_of(roles), "copies_dropped": dropped or {}}
    if dropped is None:
        record["drawn"] = digest_of(roles)  # the split as drawn, before copies were taken out
    else:
        record["drawn"] = json.loads((out / "split.json").read_text(encoding="utf-8"))["drawn"]
    (out / "split.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path, help="the unpacked 101_ObjectCategories folder")
    p.add_argument("--out", required=True, type=Path, help="where the split (symbolic links) goes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.images.is_dir():
        print(f"error: {args.images} is not a folder; unpack 101_ObjectCategories first (see --help)", file=sys.stderr)
        return 2
    existing = args.out / "split.json"
    roles = split(args.images, args.seed)
    if existing.exists() and json.loads(existing.read_text(encoding="utf-8")).get("drawn") != digest_of(roles):
        print(f"error: {args.out} holds another split; give an empty --out", file=sys.stderr)
        return 2
    write(roles, args.out)
    record = write(roles, args.out, drop_copies(args.out, roles))
    print(f"{record['classes']} classes: " + ", ".join(f"{r} {n:,}" for r, n in record["counts"].items())
          + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
