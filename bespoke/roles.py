"""The three roles a run's images play, and the check that they share no image.

*Distillation* images (``data``) train the alternatives and fine-tune the students; *selection*
images (``val_data``, or a slice held back from ``data``: ``build.validation_images``) profile
the alternatives, re-rank candidates and pick students; *scoring* images (``score_data``) are
touched once, at the end of ``bespoke run``, to score the teacher and the saved students. An image
in two roles makes a score dishonest, so :func:`check_disjoint` refuses it, by file, by bytes and
by pixels (:func:`image_digests`). :func:`role_summary` gives each role's count and digest, for
report.json and for benchmarks. This module builds on :mod:`bespoke.data`, which does not import it.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

import torch

from bespoke.data import ImageSet, _Item, _select, _to_pil_or_tensor, open_images, roots
from bespoke.errors import UsageError


ROLES = {"distill": "distillation images (data)", "selection": "selection images (val_data, or held out from data)",
         "scoring": "scoring images (score_data)"}
THUMB = 16  # side of the grey thumbnail that tells "the same pixels"
SAME_PIXELS = 4.0  # RMS distance (grey levels of 255) of two thumbnails of the same pixels, at most
_CACHE: dict[tuple[str, int, int], tuple[str, Any]] = {}  # (path, size, mtime) -> (sha256, thumbnail)


@dataclass(frozen=True)
class Digest:
    """One image's identity: the file it was read from (resolved; ``None`` without one), the
    sha256 of its bytes (of its decoded pixels without a file) and a 16x16 grey thumbnail of its
    decoded pixels (uint8 array; ``None`` when it does not decode, or is a preprocessed tensor)."""

    name: str
    path: str | None
    sha256: str
    thumb: Any = None


def open_roles(data: str | Sequence[str] | None, val_data: str | Sequence[str] | None = None,
               score_data: str | Sequence[str] | None = None, *, class_list: str | None = None,
               held_out: int = 64, seed: int = 0) -> dict[str, ImageSet]:
    """The images of each role, listed (not decoded), the distillation and selection images
    exactly as :func:`prepare` splits them (distinct images, no views); ``scoring`` only with
    ``score_data``."""
    images = open_images(data, class_list)
    given = open_images(val_data, class_list, "val_data") if roots(val_data) else None
    train, val = _select(images, given, held_out, seed)
    out = {"distill": train, "selection": val}
    if roots(score_data):
        out["scoring"] = open_images(score_data, class_list, "score_data")
    return out


def _thumb(img: Any) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(img.convert("RGB").convert("L").resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.uint8)


def _file_digest(path: Path) -> tuple[str, Any]:
    from PIL import Image

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        raw = path.read_bytes()
        try:
            img = Image.open(io.BytesIO(raw))
            img.draft("RGB", (4 * THUMB, 4 * THUMB))  # JPEG: decoded at 1/2 to 1/8 scale, much faster
            thumb = _thumb(img)
        except Exception:  # undecodable: its bytes still identify it
            thumb = None
        _CACHE[key] = (hashlib.sha256(raw).hexdigest(), thumb)
    return _CACHE[key]


def _item_digest(item: _Item) -> tuple[str, str | None, Any]:
    """(path, sha256, thumbnail) of one item; without a file, of its decoded pixels."""
    if item.path is not None:
        path = Path(item.path).resolve()
        return str(path), *_file_digest(path)
    raw = item.load()
    if isinstance(raw, (tuple, list)):
        raw = raw[0]
    img = _to_pil_or_tensor(raw)
    if isinstance(img, torch.Tensor):  # already preprocessed: only an exact match is meaningful
        return None, hashlib.sha256(img.detach().cpu().contiguous().numpy().tobytes()).hexdigest(), None
    return None, hashlib.sha256(f"{img.size}".encode() + img.tobytes()).hexdigest(), _thumb(img)


def image_digests(images: ImageSet, workers: int | None = None) -> list[Digest]:
    """A :class:`Digest` of every image of ``images`` (in order), files read on ``workers``
    threads (default: up to 4). About 0.4 ms an image (224 px JPEGs); repeated calls in one process
    reuse the digests of unchanged files.

    Images read from a file are identified by the file's bytes, and their pixels by the file
    decoded; items of a ``package.module:attribute`` dataset or scikit-image's samples have no
    file and are identified by their decoded pixels alone (an item given as a preprocessed tensor
    only by its values: no thumbnail). An image that does not decode gets no thumbnail and is
    counted in ``images.skipped``; an item without a file that does not load gets no digest."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item: _Item) -> Digest | None:
        try:
            path, sha, thumb = _item_digest(item)
        except Exception:
            images._skips.add(item.name)
            return None
        if thumb is None and not (item.path is None and sha):
            images._skips.add(item.name)
        return Digest(item.name, path, sha, thumb)

    with_file = [it for it in images.items if it.path is not None]
    chunks = [with_file[s:s + 256] for s in range(0, len(with_file), 256)]  # few tasks: cached digests are cheap
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        found = iter([d for chunk in pool.map(lambda c: [one(it) for it in c], chunks) for d in chunk])
    out = [next(found) if it.path is not None else one(it) for it in images.items]  # datasets: one thread
    return [d for d in out if d is not None]


def set_digest(digests: Sequence[Digest]) -> str:
    """The digest of a set of images: sha256 over their sorted sha256s (first 16 hex digits)."""
    return hashlib.sha256("\n".join(sorted(d.sha256 for d in digests)).encode()).hexdigest()[:16]


def _overlap(a: Sequence[Digest], b: Sequence[Digest]) -> list[tuple[Digest, Digest, str]]:
    """(image of a, image of b, why) for every pair of the same file, bytes or pixels."""
    import numpy as np

    found: dict[tuple[int, int], tuple[Digest, Digest, str]] = {}
    for attr, why in (("path", "the same file"), ("sha256", "the same bytes")):
        index: dict[Any, list[int]] = {}
        for i, d in enumerate(a):
            if getattr(d, attr) is not None:
                index.setdefault(getattr(d, attr), []).append(i)
        for j, d in enumerate(b):
            for i in index.get(getattr(d, attr), []) if getattr(d, attr) is not None else []:
                found.setdefault((i, j), (a[i], d, why))
    ia = [i for i, d in enumerate(a) if d.thumb is not None]
    ib = [j for j, d in enumerate(b) if d.thumb is not None]
    if ia and ib:
        xb = np.stack([b[j].thumb for j in ib]).reshape(len(ib), -1).astype(np.float32)
        nb = (xb * xb).sum(1)
        limit = SAME_PIXELS ** 2 * xb.shape[1]
        for s in range(0, len(ia), 1024):  # squared distances, a block of rows at a time
            rows = ia[s:s + 1024]
            xa = np.stack([a[i].thumb for i in rows]).reshape(len(rows), -1).astype(np.float32)
            dist = (xa * xa).sum(1)[:, None] + nb[None, :] - 2 * xa @ xb.T
            for r, c in zip(*np.nonzero(dist <= limit)):
                found.setdefault((rows[r], ib[c]), (a[rows[r]], b[ib[c]], "the same pixels"))
    return [found[k] for k in sorted(found)]


def shared_images(a: ImageSet, b: ImageSet, workers: int | None = None) -> list[tuple[str, str, str]]:
    """``(image of a, image of b, why)`` for every pair the roles' check counts as one image (the
    same file, bytes or pixels, :func:`check_disjoint`): what to take out of one of two sets
    before they can play two roles. Images are named by their path (or name, without a file)."""
    return [(_shown(p), _shown(q), why) for p, q, why in _overlap(image_digests(a, workers), image_digests(b, workers))]


def _shown(d: Digest) -> str:
    return d.path or d.name


def check_disjoint(roles: dict[str, ImageSet], pairs: Sequence[tuple[str, str]] | None = None,
                   workers: int | None = None) -> dict[str, list[Digest]]:
    """Digest every role's images (:func:`image_digests`) and raise :class:`UsageError` when two
    roles of ``pairs`` (default: every pair) share an image: the same file (resolved path), the
    same bytes, or the same pixels (16x16 grey thumbnails within :data:`SAME_PIXELS` grey levels
    RMS: a copy re-encoded at another JPEG quality, or as PNG, is caught). The message names up
    to 5 pairs and counts them all. Returns the digests by role."""
    digests = {role: image_digests(images, workers) for role, images in roles.items()}
    problems = []
    for x, y in pairs if pairs is not None else list(combinations(roles, 2)):
        same = _overlap(digests[x], digests[y])
        if same:
            shown = "\n".join(f"  {_shown(p)} ({why} in both)" if why == "the same file"
                              else f"  {_shown(p)} = {_shown(q)} ({why})" for p, q, why in same[:5])
            more = f"\n  and {len(same) - 5} more" if len(same) > 5 else ""
            problems.append(f"the {ROLES.get(x, x)} and the {ROLES.get(y, y)} share {len(same)} "
                            f"image(s):\n{shown}{more}")
    if problems:
        raise UsageError("\n".join(problems) + "\na run must not choose or score on an image it distilled on, "
                         "nor score on one it chose on: remove these images from one of the two, or give "
                         "folders that share none")
    return digests


def role_summary(roles: dict[str, ImageSet], pairs: Sequence[tuple[str, str]] | None = None,
                 workers: int | None = None) -> dict[str, Any]:
    """:func:`check_disjoint`, then ``{<role>_images: count, <role>_digest: set digest}`` for
    every role given and for distill, selection and scoring (0 and ``None`` when absent). Both
    count the images that decode (or have no file): those a run can use."""
    digests = check_disjoint(roles, pairs, workers)
    out: dict[str, Any] = {}
    for role in [*ROLES, *(r for r in roles if r not in ROLES)]:
        usable = [d for d in digests.get(role, []) if d.thumb is not None or d.path is None]
        out[f"{role}_images"] = len(usable)
        out[f"{role}_digest"] = set_digest(usable) if role in roles else None
    return out


__all__ = ["Digest", "ROLES", "SAME_PIXELS", "check_disjoint", "image_digests", "open_roles", "role_summary",
           "shared_images",
           "set_digest"]
