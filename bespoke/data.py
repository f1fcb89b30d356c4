"""Image data for distillation, selection, scoring and calibration.

Three kinds of source, all giving ``(image tensor, label)`` pairs preprocessed with timm's own
transforms for the teacher (``timm.data.create_transform`` on :func:`bespoke.models.data_config`):

- an image **folder**: flat, or one subfolder per class. Labels come from the subfolder names
  (sorted, like torchvision's ``ImageFolder``), or, with a ``classes.txt`` file of
  ``index wnid name`` lines (given, or found in the folder or its parent), from the WordNet id that
  starts each file or subfolder name. Without either, images are unlabelled (label ``-1``).
- a **dataset given as** ``package.module:attribute``: a map-style dataset (or a callable returning
  one) whose items are an image (PIL, HWC uint8 array, or CHW tensor) or ``(image, label)``.
- the **offline default**: the sample photographs bundled with scikit-image (``skimage.data``:
  astronaut, coffee, chelsea, rocket, ...). They are a dozen images at most: enough to run the
  pipeline end to end and to check it works, far too few for useful distillation. Use a real image
  folder (a few hundred to a few thousand images of the teacher's domain) for real results.

Several sources (**roots**) combine into one :class:`ImageSet` (:func:`open_images` with a list):
item names are prefixed by the root, and the set is labelled only when every root is, by labels
that mean the same classes (:func:`combine`).

A run's images play three **roles** that must not share an image
(:func:`bespoke.roles.check_disjoint`): *distillation* (``data``), *selection* (``val_data``, or a
slice held back from ``data``) and *scoring* (``score_data``, touched once at the end of a run).
:func:`bespoke.roles.role_summary` checks them and gives their counts and digests; ``bespoke.roles``
imports this module, never the other way round.

Images that fail to decode are skipped and counted (:attr:`ImageSet.skipped`); the caller reports
them (:func:`skipped_line`). Batches are assembled with :func:`collate`, which drops them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from bespoke.errors import UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
WNID_RE = re.compile(r"^(n\d{8})")
BALANCE = ("none", "class", "root")  # how the distillation images are drawn (ImageSet.balanced)

# Colour photographs bundled with scikit-image (no download needed); grey ones are made RGB.
SKIMAGE_SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "cat", "camera", "coins", "moon",
                   "page", "text", "grass", "gravel", "brick", "colorwheel")


@dataclass
class _Item:
    name: str
    label: int
    load: Callable[[], Any]  # -> PIL image, ndarray or tensor
    path: Path | None = None  # the file it is read from, when there is one
    root: str = ""  # the root it came from, in a set of several roots


@dataclass(frozen=True)
class Labels:
    """How a root's images are labelled: ``kind`` is ``wnid`` (WordNet ids through a class list),
    ``folders`` (the index of the sorted subfolder names) or ``dataset`` (the dataset's own);
    ``key`` is what two roots must share for their labels to mean the same classes; ``origin``
    says it in words."""

    kind: str
    key: Any
    origin: str


@dataclass
class _Skips:
    names: list[str] = field(default_factory=list)

    def add(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)


class ImageSet(Dataset):
    """A list of images with labels and one preprocessing transform.

    ``with_transform`` and ``subset`` give views sharing the same skip counter, so failures seen
    through any view are counted once in :attr:`skipped`.
    """

    def __init__(self, items: Sequence[_Item], *, labelled: bool, source: str,
                 transform: Callable[[Any], torch.Tensor] | None = None,
                 skips: _Skips | None = None, labels: Labels | None = None, note: str = ""):
        self.items = list(items)
        self.note = note  # what to know about how its roots combined
        self.labelled = labelled
        self.source = source
        self.transform = transform
        self.labels = labels if labelled else None  # how, when labelled
        self._skips = skips if skips is not None else _Skips()

    def _like(self, items: Sequence[_Item], transform: Any) -> "ImageSet":
        return ImageSet(items, labelled=self.labelled, source=self.source, transform=transform,
                        skips=self._skips, labels=self.labels, note=self.note)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def skipped(self) -> list[str]:
        """Names of the images that failed to decode so far."""
        return list(self._skips.names)

    def per_root(self) -> dict[str, int]:
        """Images per root (in order), for a set combined from several; ``{source: n}`` else."""
        counts: dict[str, int] = {}
        for item in self.items:
            key = item.root or self.source
            counts[key] = counts.get(key, 0) + 1
        return counts

    def with_transform(self, transform: Callable[[Any], torch.Tensor] | None) -> "ImageSet":
        return self._like(self.items, transform)

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        return self._like([self.items[i] for i in indices], self.transform)

    def views(self, k: int, seed: int = 0) -> "ImageSet":
        """Each image ``k`` times: itself, then ``k - 1`` fixed crops (35-100 % of its area,
        aspect 3:4 to 4:3) and flips of it, the same on every call (seeded per image and view)
        and before this set's transform, so every input size sees the same views. Counts an
        agreement over a handful of held-out images on more than a handful of inputs."""
        if k <= 1:
            return self
        items = [item if j == 0 else _Item(f"{item.name}#view{j}", item.label,
                                           (lambda item=item, j=j: _view(item.load(), seed * 7919 + n * 101 + j)),
                                           root=item.root)
                 for n, item in enumerate(self.items) for j in range(k)]
        return self._like(items, self.transform)

    def balanced(self, by: str, seed: int = 0) -> "ImageSet":
        """As many images as this set, drawn so that every group has an equal share: ``by``
        ``class`` (each label; unlabelled images grouped by their root) or ``root``; ``none``
        gives this set itself. Within a group the images are taken in a seeded order and again
        from the start when its share is larger than the group (a small group's images repeat,
        each time under its own augmentation seed); the draws come in one seeded order. One
        group, or groups all of one size, give this set itself. A pool skewed to a few classes
        (``imagenet-extra/distill`` is 98 % twenty classes) then trains the blocks on the
        classes the network will see, not on those the folder holds most of."""
        if by not in BALANCE:
            raise UsageError(f"data_balance {by!r} is not one of {', '.join(BALANCE)}")
        if by == "none" or not self.items:
            return self
        groups: dict[Any, list[int]] = {}
        for i, item in enumerate(self.items):
            key = ("label", item.label) if by == "class" and item.label >= 0 else ("root", item.root)
            groups.setdefault(key, []).append(i)
        if len({len(g) for g in groups.values()}) <= 1:
            return self
        g = torch.Generator().manual_seed(seed * 7_919 + 17)
        n, k = len(self.items), len(groups)
        drawn: list[int] = []
        for j, members in enumerate(groups.values()):
            share = n // k + (j < n % k)
            order = [members[t] for t in torch.randperm(len(members), generator=g).tolist()]
            drawn += [order[t % len(order)] for t in range(share)]
        drawn = [drawn[t] for t in torch.randperm(len(drawn), generator=g).tolist()]
        return self._like([self.items[i] for i in drawn], self.transform)

    def distinct(self) -> "ImageSet":
        """Each image once, in the order of its first appearance (a :meth:`balanced` set repeats
        the images of small groups)."""
        seen: set[int] = set()
        keep = []
        for i, item in enumerate(self.items):
            if id(item) not in seen:
                seen.add(id(item))
                keep.append(i)
        return self if len(keep) == len(self.items) else self.subset(keep)

    def __getitem__(self, i: int):
        item = self.items[i]
        label = item.label
        try:
            raw = item.load()
            if isinstance(raw, (tuple, list)):  # a dataset's (image, label) pair
                raw, lab = raw[0], raw[1]
                label = int(lab.item() if isinstance(lab, torch.Tensor) else lab)
            img = _to_pil_or_tensor(raw)
            x = img if self.transform is None or isinstance(img, torch.Tensor) else self.transform(img)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"transform gave {type(x).__name__}, not a tensor")
        except Exception:  # unreadable or undecodable: skip it, count it
            self._skips.add(item.name)
            return None
        return x, label


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """A batch of images ``(N, C, H, W)`` laid out channels-last in memory: the same values, on
    which CPU convolutions run about twice as fast (EfficientNet-Lite2 on this project's 2-core
    machine: inference on 32 images at 260 px 2.6 -> 1.4 s, a training step on 16 at 224 px
    1.6 -> 0.85 s; the layers' outputs follow the input's layout). Anything not 4-D is returned
    as it is. Latency is never measured on such batches: a model is timed as it ships."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stack ``(image, label)`` pairs, dropping images that failed to decode (``None``), into a
    channels-last batch (:func:`fast_layout`)."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return fast_layout(torch.stack([b[0] for b in batch])), torch.tensor([b[1] for b in batch], dtype=torch.long)


def _view(raw: Any, seed: int) -> Any:
    """One fixed random-resized crop (no resize: the transform does that) and flip of an image."""
    import math
    import random

    if isinstance(raw, (tuple, list)):  # a dataset's (image, label) pair
        return (_view(raw[0], seed), *raw[1:])
    img = _to_pil_or_tensor(raw)
    if isinstance(img, torch.Tensor):
        return img
    rng = random.Random(seed)
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.35, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            img = img.crop((x, y, x + cw, y + ch))
            break
    if rng.random() < 0.5:
        from PIL import Image

        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def _to_pil_or_tensor(img: Any) -> Any:
    """PIL images are decoded now (so truncated files fail here) and made RGB."""
    from PIL import Image

    if isinstance(img, torch.Tensor):
        return img.float()
    if isinstance(img, Image.Image):
        img.load()
        return img.convert("RGB")
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        raise TypeError(f"cannot read an image from {type(img).__name__}")
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3:
        raise TypeError(f"image array of shape {arr.shape}; need HxW or HxWxC")
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def read_class_list(path: str | Path) -> dict[str, int]:
    """``index wnid name`` lines (tab or space separated) -> {wnid: index}."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"class list {str(p)!r} does not exist; give a classes.txt with lines 'index wnid name'")
    out: dict[str, int] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        try:
            out[parts[1]] = int(parts[0])
        except (IndexError, ValueError):
            raise UsageError(f"class list {str(p)!r} line {n}: {line!r} is not 'index wnid name'") from None
    return out


def _find_class_list(folder: Path) -> Path | None:
    for candidate in (folder / "classes.txt", folder.parent / "classes.txt"):
        if candidate.is_file():
            return candidate
    return None


def _open_image(path: Path) -> Callable[[], Any]:
    def load():
        from PIL import Image

        return Image.open(path)

    return load


def folder_images(path: str | Path, class_list: str | Path | None = None, key: str = "data") -> ImageSet:
    """Images of a folder (flat or class subfolders); see the module docstring for labels.
    ``key``: the configuration key it was given as, for messages."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UsageError(f"{key}: image folder {str(root)!r} does not exist; give an existing folder "
                         f"of images (flat, or one subfolder per class)"
                         + (", or leave it out to use scikit-image's sample photos" if key == "data" else ""))
    if not root.is_dir():
        raise UsageError(f"{key}: {str(root)!r} is not a folder; give a folder of images, or "
                         f"package.module:attribute for a dataset")
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise UsageError(f"image folder {str(root)!r} cannot be read ({exc}); check its permissions") from None
    list_path = Path(class_list) if class_list else _find_class_list(root)
    wnids = read_class_list(list_path) if list_path else None
    subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    files = [e for e in entries if e.is_file() and e.suffix.lower() in IMAGE_SUFFIXES]
    items: list[_Item] = []
    by_wnid = Labels("wnid", tuple(sorted((wnids or {}).items())), f"WordNet ids through {list_path}")

    def wnid_label(name: str) -> int | None:
        m = WNID_RE.match(name)
        return wnids.get(m.group(1)) if (wnids and m) else None

    labels: Labels | None = None
    if subdirs and not files:
        mapped = {d.name: wnid_label(d.name) for d in subdirs}
        missing = [name for name, label in mapped.items() if label is None]
        if wnids and 0 < len(missing) < len(subdirs):  # half by WordNet id, half by index: nonsense labels
            raise UsageError(f"{len(missing)} of the {len(subdirs)} class subfolders of {str(root)!r} are not in "
                             f"the class list {str(list_path)!r} ({', '.join(missing[:5])}"
                             f"{', ...' if len(missing) > 5 else ''}); give a class_list that holds them all")
        if missing:
            mapped = {d.name: i for i, d in enumerate(subdirs)}
            labels = Labels("folders", tuple(mapped), f"its {len(subdirs)} sorted subfolder names")
        else:
            labels = by_wnid
        for d in subdirs:
            for f in sorted(d.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    items.append(_Item(str(f.relative_to(root)), mapped[d.name], _open_image(f), path=f))
    else:
        found = [wnid_label(f.name) for f in files]
        if files and all(lab is not None for lab in found):
            labels = by_wnid
        for f, lab in zip(files, found):
            items.append(_Item(f.name, lab if labels else -1, _open_image(f), path=f))
    if not items:
        raise UsageError(f"image folder {str(root)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                         f"put images in it (flat, or one subfolder per class)")
    return ImageSet(items, labelled=labels is not None, source=str(root), labels=labels)


def attribute_images(ref: str) -> ImageSet:
    """A dataset given as ``package.module:attribute`` (a dataset, or a callable returning one)."""
    from bespoke.resolve import resolve

    obj = resolve(ref, "dataset")
    ds = obj() if callable(obj) and not hasattr(obj, "__getitem__") else obj
    if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        raise UsageError(f"dataset {ref!r} is a {type(ds).__name__}; it must be a map-style dataset "
                         f"(__len__ and __getitem__) or a callable returning one")
    n = len(ds)
    if n == 0:
        raise UsageError(f"dataset {ref!r} is empty")
    first = ds[0]
    labelled = isinstance(first, (tuple, list)) and len(first) >= 2

    def loader(i: int) -> Callable[[], Any]:
        def load():  # the label, when there is one, is read with the image (one access)
            item = ds[i]
            if isinstance(item, (tuple, list)):
                return (item[0], item[1]) if labelled else item[0]
            return item
        return load

    items = [_Item(f"{ref}[{i}]", -1, loader(i)) for i in range(n)]
    return ImageSet(items, labelled=labelled, source=ref, labels=Labels("dataset", ref, f"the labels of {ref}"))


def sample_images() -> ImageSet:
    """scikit-image's bundled sample photographs (unlabelled; a dozen images at most)."""
    try:
        import skimage.data as skd
    except ImportError:
        raise UsageError("no --data given and scikit-image is not installed for the default sample "
                         "photos; pass --data FOLDER or `pip install scikit-image`") from None
    items = []
    for name in SKIMAGE_SAMPLES:
        fn = getattr(skd, name, None)
        if fn is None:
            continue
        try:
            arr = fn()
        except Exception:  # some samples need a download; offline they are simply absent
            continue
        if getattr(arr, "ndim", 0) not in (2, 3):
            continue
        items.append(_Item(f"skimage.data.{name}", -1, (lambda a=arr: a)))
    if not items:
        raise UsageError("scikit-image's sample photos could not be read; pass --data FOLDER")
    return ImageSet(items, labelled=False, source="scikit-image sample photos")


def roots(spec: str | Path | Sequence[str | Path] | None) -> list[str]:
    """A ``data``-like value as a list of roots: ``None`` -> ``[]``, one -> ``[one]``."""
    if spec is None:
        return []
    if isinstance(spec, (str, Path)):
        return [str(spec)]
    return [str(s) for s in spec]


def open_images(spec: str | Sequence[str] | None, class_list: str | Path | None = None,
                key: str = "data") -> ImageSet:
    """A root or a list of roots (folder paths, ``package.module:attribute``) as one set;
    ``None`` for scikit-image's sample photos. Several roots combine (:func:`combine`)."""
    specs = roots(spec)
    if not specs:
        return sample_images()
    sets = [_open_root(s, class_list, key) for s in specs]
    if len(sets) == 1:
        return sets[0]
    return combine(sets, _root_names(specs), key)


def _is_ref(spec: str) -> bool:
    """``package.module:attribute`` rather than a path."""
    return ":" in spec and not Path(spec).exists() and "/" not in spec.split(":")[0]


def _open_root(spec: str, class_list: str | Path | None, key: str) -> ImageSet:
    return attribute_images(spec) if _is_ref(spec) else folder_images(spec, class_list, key)


def _root_names(specs: Sequence[str]) -> list[str]:
    """Short unique names of roots: the fewest trailing path parts that tell them apart."""
    parts = [(s,) if _is_ref(s) else (Path(s).expanduser().parts or (s,)) for s in specs]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n}#{i}" for i, n in enumerate(names)]


def combine(sets: Sequence[ImageSet], names: Sequence[str], key: str = "data") -> ImageSet:
    """One set of several roots' images, each item's name prefixed by its root's name.

    Labelled only when every root is, by labels that mean the same classes: WordNet ids through
    one class list (or a dataset's own labels, taken as the teacher's class indices), or the
    index of the same sorted subfolder names. A root labelled one way and another root another
    way is a :class:`UsageError` that asks for ``class_list``; with unlabelled roots among them,
    the set is unlabelled."""
    resolved = [Path(s.source).expanduser().resolve() if Path(s.source).exists() else s.source for s in sets]
    for i, r in enumerate(resolved):
        if r in resolved[:i]:
            raise UsageError(f"{key} names {sets[i].source!r} twice; give each root once")
    labelled = all(s.labelled for s in sets)
    if labelled:  # WordNet ids and a dataset's labels are both the teacher's class indices
        kinds = {"folders" if s.labels.kind == "folders" else "classes" for s in sets}
        keys = {s.labels.key for s in sets if s.labels.kind != "dataset"}
        if len(kinds) > 1 or len(keys) > 1:
            how = "; ".join(f"{n} by {s.labels.origin}" for n, s in zip(names, sets))
            raise UsageError(f"the roots of {key} label their images in different ways ({how}): the same label "
                             "would not mean the same class. Give class_list (a classes.txt of 'index wnid name' "
                             "lines; --class-list) so that every root is labelled by WordNet id through it")
    items = []
    for name, s in zip(names, sets):
        prefix = "" if s.items[0].name.startswith(f"{s.source}[") else f"{name}/"  # a dataset's names are ref[i]
        for it in s.items:
            load = it.load if labelled or s.labels is None or s.labels.kind != "dataset" else _image_only(it.load)
            items.append(_Item(prefix + it.name, it.label if labelled else -1, load, path=it.path, root=name))
    bare = [n for n, s in zip(names, sets) if not s.labelled]
    note = (f"{', '.join(bare)} {'has' if len(bare) == 1 else 'have'} no labels (files named by WordNet id need a "
            f"class_list), so the images of {key} are unlabelled as a whole" if bare and len(bare) < len(sets) else "")
    return ImageSet(items, labelled=labelled, source=" + ".join(s.source for s in sets),
                    labels=next((s.labels for s in sets if s.labels.kind != "dataset"), sets[0].labels)
                    if labelled else None, note=note)


def _image_only(load: Callable[[], Any]) -> Callable[[], Any]:
    """A dataset item's loader without its label (in a set that is unlabelled as a whole)."""
    def image():
        raw = load()
        return raw[0] if isinstance(raw, (tuple, list)) else raw
    return image


def transforms_for(model: torch.nn.Module, input_size: int, *, augment: bool = False):
    """timm's preprocessing for ``model`` at ``input_size`` (train-time augmentation if asked)."""
    from timm.data import create_transform

    from bespoke.models import data_config

    cfg = data_config(model, input_size)
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=augment)


def split_indices(n: int, held_out: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """A deterministic split of ``range(n)`` into (train, held-out); training keeps at least half."""
    held_out = max(0, min(held_out, n // 2))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held_out:]), sorted(order[:held_out])


@dataclass
class DataSplit:
    """What distillation needs: training images, held-out images, and where they came from."""

    train: ImageSet
    val: ImageSet
    labelled: bool
    source: str
    val_views: int = 1  # each held-out image counted this many times, as fixed views of it
    per_root: dict[str, int] = field(default_factory=dict)  # images of data (and val_data) per root
    note: str = ""  # how its roots combined, when there is something to say
    balance: str = "none"  # how train was drawn from the distillation images (ImageSet.balanced)
    pool_images: int = 0  # the distillation images train was drawn from (the same when not balanced)

    @property
    def val_images(self) -> int:
        """Distinct held-out images (``len(val)`` counts views)."""
        return len(self.val) // self.val_views

    @property
    def skipped(self) -> list[str]:
        return sorted(set(self.train.skipped) | set(self.val.skipped))


def _select(images: ImageSet, val: ImageSet | None, held_out: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(distillation, selection) images: all of ``images`` and a fixed subset of ``held_out`` of
    ``val``, or, without ``val``, a deterministic split of ``images``."""
    if val is None:
        tr, va = split_indices(len(images), held_out, seed)
        return images.subset(tr), images.subset(va)
    if held_out < len(val):  # a deterministic subset of the given held-out images
        order = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed)).tolist()
        val = val.subset(sorted(order[:held_out]))
    return images, val


def prepare(model: torch.nn.Module, input_size: int, *, data: str | Sequence[str] | None,
            val_data: str | Sequence[str] | None = None, class_list: str | None = None, held_out: int = 64,
            augment: bool = False, seed: int = 0, val_views: int = 1, balance: str = "none") -> DataSplit:
    """Open the training (and held-out) images and attach the teacher's transforms.

    Without ``val_data`` the held-out images are split off ``data`` deterministically.
    ``val_views``: each held-out image that many times, as fixed views (:meth:`ImageSet.views`).
    ``balance``: the training images drawn with an equal share per class or root
    (:meth:`ImageSet.balanced`), after the held-out images are taken off.
    """
    train_t = transforms_for(model, input_size, augment=augment)
    eval_t = transforms_for(model, input_size, augment=False)
    images = open_images(data, class_list)
    given = open_images(val_data, class_list, "val_data") if roots(val_data) else None
    train, val = _select(images, given, held_out, seed)
    pool_images = len(train)
    drawn = train.balanced(balance, seed)
    if drawn is train:  # nothing to balance: the images as they are
        balance = "none"
    train = drawn
    per_root = {**images.per_root(), **({f"held out: {k}": n for k, n in given.per_root().items()} if given else {})}
    return DataSplit(train=train.with_transform(train_t), val=val.views(val_views, seed).with_transform(eval_t),
                     labelled=images.labelled and val.labelled, source=images.source, val_views=max(1, val_views),
                     per_root=per_root, note="; ".join(n for n in (images.note, given.note if given else "") if n),
                     balance=balance, pool_images=pool_images)


def eval_view(split: DataSplit, model: torch.nn.Module, input_size: int) -> ImageSet:
    """The training images with evaluation preprocessing (for calibration)."""
    return split.train.with_transform(transforms_for(model, input_size, augment=False))


# --------------------------------------------------------------------------------------------
# One line each, for the console
# --------------------------------------------------------------------------------------------


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` (>= 12) columns: its start, ``...`` and its last 6 characters."""
    width = max(width, 12)
    return text if len(text) <= width else text[:width - 9] + "..." + text[-6:]


def _fit(head: str, parts: Sequence[str], width: int) -> str:
    """``head`` and as many of ``parts`` (comma-separated) as fit in ``width`` columns, then how
    many more; the first one is shortened to fit, when it has to be."""
    line = head
    for i, part in enumerate(parts):
        rest = len(parts) - i - 1
        room = width - len(line) - (2 if i else 0) - len(f" and {rest} more" if rest else "")
        if len(part) > room:
            if i:
                return line + f" and {len(parts) - i} more"
            part = _cut(part, room)
        line += (", " if i else "") + part
    return line


def counts_line(head: str, counts: dict[str, int], width: int = 80) -> str:
    """``head: a 500, b 12447``: every root, on as many lines of at most ``width`` columns as it
    takes (the next ones indented by two; long root names by their tail)."""
    def short(name: str) -> str:
        return name if len(name) <= 40 else "..." + name[-37:]

    lines, line = [], f"{head}: "
    parts = [f"{short(k)} {n}" for k, n in counts.items()]
    for i, part in enumerate(parts):
        piece = part + ("," if i < len(parts) - 1 else "")
        if line.strip() and not line.endswith(": ") and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = "  " + piece
        else:
            line += ("" if line.endswith(": ") else " ") + piece
    lines.append(line)
    return "\n".join(lines)


def skipped_line(names: Sequence[str], width: int = 71) -> str:
    """One line that counts the images that failed to decode and names the first few (by file
    name), in ``width`` columns (80 less a ``warning: `` prefix)."""
    names = sorted(set(names))
    return _fit(f"skipped {len(names)} undecodable image(s): ", [Path(n).name or n for n in names], width)

