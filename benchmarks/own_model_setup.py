"""Set-up of the own-model benchmark: the user's fine-tuned teacher and the practitioner's siblings.

    python benchmarks/own_model_setup.py --split DIR/caltech101-split [--cache DIR]

Made once and reused from the cache folder (default ``~/.cache/bespoke/own-model``); a model
already in the cache is not made again, and a killed set-up starts again where it was (each
model's features and checkpoint are written when done).

- **The teacher** (what a user brings): ``tf_efficientnet_lite2`` with its packaged ImageNet
  weights, a new 100-way classifier, fine-tuned on ``train/`` (labels) at its own 260 px.
- **The siblings** (the practitioner's alternative): ``tf_efficientnet_lite0`` (224 px) and
  ``tf_efficientnet_lite1`` (240 px) from their ImageNet weights, fine-tuned the same way on the
  same labelled images, with a distillation term from the teacher as well as the labels (the
  teacher sees the same crop: function matching).

What is frozen, and why: on two CPU cores a full fine-tune of Lite2 runs at about 4 images/s
(17 minutes an epoch). So the stem and blocks 0-4 (to stride 16) stay as pretrained, with
BatchNorm in eval mode, and their output is computed once for ``--views`` augmented crops of
every training image (the same crop for all three networks, each at its own size); blocks 5-6,
the head convolution and the new classifier train on those cached features (BatchNorm in train
mode), AdamW with a one-cycle schedule over ``--max-epochs`` (10; an epoch of the teacher's top
takes about 3 minutes here). Each model trains until its top-1 on ``selection/`` has not risen for
``--patience`` (2) epochs, or the schedule ends, and the best epoch is kept. ``test/`` is never
read here.

Writes ``CACHE/{teacher,lite0,lite1}.safetensors`` (full timm state dicts, 100 classes) and
``CACHE/setup.json`` (selection top-1, epochs, CPU-minutes of each model, what was frozen).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"teacher": ("tf_efficientnet_lite2", 260), "lite0": ("tf_efficientnet_lite0", 224),
          "lite1": ("tf_efficientnet_lite1", 240)}
FROZEN_BLOCKS = 5  # stem and blocks 0-4 frozen; blocks 5-6, conv_head, bn2, classifier train
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bespoke" / "own-model"


def cpu_minutes() -> float:
    t = os.times()
    return (t.user + t.system + t.children_user + t.children_system) / 60.0


def labelled_files(folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())]
    return files, classes


def load_base(name: str, classes: int):
    from bespoke.models import load_model

    model = load_model(name, weights="packaged")
    model.reset_classifier(classes)
    return model.eval()


def frozen_part(model):
    return torch.nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:FROZEN_BLOCKS]).eval()


class Top(torch.nn.Module):
    """What trains: blocks 5-6, the head convolution and the classifier."""

    def __init__(self, model):
        super().__init__()
        self.blocks = torch.nn.Sequential(*model.blocks[FROZEN_BLOCKS:])
        self.conv_head, self.bn2, self.pool, self.classifier = model.conv_head, model.bn2, model.global_pool, model.classifier

    def forward(self, x):
        return self.classifier(self.pool(self.bn2(self.conv_head(self.blocks(x)))))


def normalise(img, size):
    from torchvision.transforms import functional as TF

    img = TF.resize(img, [size, size], interpolation=TF.InterpolationMode.BICUBIC)
    return TF.normalize(TF.to_tensor(img), [0.5] * 3, [0.5] * 3)


def crop_views(path: Path, views: int, seed: int):
    """``views`` random-resized crops (scale 0.25-1) of one image, flipped at random, as PIL images:
    the same crops go to every network, each resized to its own input size."""
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms import functional as TF

    img = Image.open(path).convert("RGB")
    rng = random.Random(seed)
    out = []
    for v in range(views):
        torch.manual_seed(seed * 1000 + v)
        i, j, h, w = RandomResizedCrop.get_params(img, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3))
        crop = TF.crop(img, i, j, h, w)
        out.append(TF.hflip(crop) if rng.random() < 0.5 else crop)
    return out


def cache_features(split: Path, cache: Path, views: int, names: list[str], per_class: int = 0) -> dict[str, float]:
    """Frozen-part features of ``views`` crops of every training image (``per_class``: the first
    that many of each class only) and of the selection images (eval transform), for each of
    ``names``; saved per model. Returns CPU-minutes per model."""
    from bespoke.data import transforms_for

    todo = [n for n in names if not (cache / f"features-{n}.pt").exists()]
    if not todo:
        return {}
    train, classes = labelled_files(split / "train")
    if per_class:
        kept, counts = [], {}
        for f, y in train:
            if counts.get(y, 0) < per_class:
                kept.append((f, y))
                counts[y] = counts.get(y, 0) + 1
        train = kept
    sel, _ = labelled_files(split / "selection")
    models = {n: load_base(MODELS[n][0], len(classes)) for n in todo}
    parts = {n: frozen_part(m) for n, m in models.items()}
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in todo}
    spent = {n: 0.0 for n in todo}
    batch: list = []
    t0 = time.time()

    def flush():
        for n in todo:
            c = cpu_minutes()
            x = torch.stack([normalise(img, MODELS[n][1]) for img in batch])
            with torch.no_grad():
                feats[n].append(parts[n](x).half())
            spent[n] += cpu_minutes() - c
        batch.clear()

    for k, (path, _) in enumerate(train):
        batch.extend(crop_views(path, views, seed=k))
        if len(batch) >= 32:
            flush()
        if k % 500 == 0:
            print(f"  features: {k}/{len(train)} images, {time.time() - t0:.0f} s", flush=True)
    if batch:
        flush()
    for n in todo:
        from PIL import Image

        t = transforms_for(models[n], MODELS[n][1])
        c = cpu_minutes()
        with torch.no_grad():
            xs = [parts[n](torch.stack([t(Image.open(p).convert("RGB")) for p, _ in sel[i:i + 32]])).half()
                  for i in range(0, len(sel), 32)]
        spent[n] += cpu_minutes() - c
        train_feats = torch.cat(feats[n]).view(len(train), views, *feats[n][0].shape[1:])
        torch.save({"train": train_feats, "train_labels": torch.tensor([y for _, y in train]),
                    "selection": torch.cat(xs), "selection_labels": torch.tensor([y for _, y in sel]),
                    "classes": classes, "views": views, "cpu_minutes": spent[n]},
                   cache / f"features-{n}.pt.tmp")
        os.replace(cache / f"features-{n}.pt.tmp", cache / f"features-{n}.pt")
    return spent


def accuracy(top, feats, labels) -> float:
    top.eval()
    with torch.no_grad():
        pred = torch.cat([top(feats[i:i + 128].float()).argmax(-1) for i in range(0, len(feats), 128)])
    return float((pred == labels).float().mean())


def train_top(name: str, cache: Path, *, teacher_logits: torch.Tensor | None, max_epochs: int, patience: int,
              lr: float, seed: int) -> dict:
    """Fine-tune ``name``'s top on its cached features until selection top-1 stops rising."""
    data = torch.load(cache / f"features-{name}.pt")
    model = load_base(MODELS[name][0], len(data["classes"]))
    top = Top(model)
    feats, labels, views = data["train"], data["train_labels"], data["views"]
    head = list(top.classifier.parameters())
    body = [p for p in top.parameters() if all(p is not h for h in head)]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": 5 * lr}], weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(feats) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, 5 * lr], total_steps=max_epochs * steps_per_epoch,
                                                pct_start=0.1)
    best, best_state, best_epoch, history = -1.0, None, 0, []
    c0 = cpu_minutes()
    g = torch.Generator().manual_seed(seed)
    for epoch in range(max_epochs):
        top.train()
        order = torch.randperm(len(feats), generator=g)
        v = epoch % views
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            logits = top(feats[idx, v].float())
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=0.1)
            if teacher_logits is not None:  # the teacher on the same crop, temperature 2
                t = teacher_logits[idx, v].float()
                loss = loss + 4.0 * F.kl_div(F.log_softmax(logits / 2, -1), F.log_softmax(t / 2, -1),
                                             log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(top, data["selection"], data["selection_labels"])
        history.append(round(acc, 4))
        print(f"  {name} epoch {epoch + 1}: selection top-1 {100 * acc:.1f} %", flush=True)
        if acc > best:
            best, best_epoch = acc, epoch + 1
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        elif epoch + 1 - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    from safetensors.torch import save_file

    save_file({k: t.contiguous() for k, t in model.state_dict().items()}, str(cache / f"{name}.safetensors.tmp"))
    os.replace(cache / f"{name}.safetensors.tmp", cache / f"{name}.safetensors")
    return {"model": MODELS[name][0], "input_size": MODELS[name][1], "selection_top1": best,
            "best_epoch": best_epoch, "epochs_run": len(history), "history": history,
            "train_cpu_minutes": cpu_minutes() - c0, "feature_cpu_minutes": data["cpu_minutes"],
            "labels": True, "distilled_from_teacher": teacher_logits is not None,
            "checkpoint": str(cache / f"{name}.safetensors")}


def teacher_logits(cache: Path) -> tuple[torch.Tensor, float]:
    """The fine-tuned teacher's logits on every cached training crop (its top on its features)."""
    data = torch.load(cache / "features-teacher.pt")
    model = load_base(MODELS["teacher"][0], len(data["classes"]))
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(cache / "teacher.safetensors")))
    top = Top(model).eval()
    c0 = cpu_minutes()
    f = data["train"]
    with torch.no_grad():
        out = torch.stack([torch.cat([top(f[i:i + 128, v].float()) for i in range(0, len(f), 128)])
                           for v in range(f.shape[1])], 1)
    return out.half(), cpu_minutes() - c0


def setup(split: Path, cache: Path, *, views: int = 2, max_epochs: int = 10, patience: int = 2,
          lr: float = 1e-3, seed: int = 0, per_class: int = 0) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    record_path = cache / "setup.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    todo = [n for n in MODELS if n not in record.get("models", {}) or not (cache / f"{n}.safetensors").exists()]
    if todo:  # the settings the cached models were made with
        record.update({"split": str(split), "frozen": "stem, bn1 and blocks 0-4 (BatchNorm in eval mode)",
                       "trained": "blocks 5-6, conv_head, bn2, a new classifier", "views": views,
                       "max_epochs": max_epochs, "patience": patience, "lr": lr, "per_class": per_class})
    if todo:
        print(f"caching frozen features of {views} crops per training image for {', '.join(todo)}", flush=True)
        cache_features(split, cache, views, todo, per_class)
    models = record.setdefault("models", {})
    if "teacher" in todo:
        models["teacher"] = train_top("teacher", cache, teacher_logits=None, max_epochs=max_epochs,
                                      patience=patience, lr=lr, seed=seed)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
    siblings = [n for n in ("lite0", "lite1") if n in todo]
    if siblings:
        logits, spent = teacher_logits(cache)
        for n in siblings:
            models[n] = train_top(n, cache, teacher_logits=logits, max_epochs=max_epochs, patience=patience,
                                  lr=lr, seed=seed)
            models[n]["teacher_logits_cpu_minutes"] = spent
            record_path.write_text(json.dumps(record, indent=1) + "\n")
    for n, m in models.items():
        m["cpu_minutes"] = round(m["train_cpu_minutes"] + m["feature_cpu_minutes"]
                                 + m.get("teacher_logits_cpu_minutes", 0.0), 2)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    for n in MODELS:
        if (cache / f"features-{n}.pt").exists() and (cache / f"{n}.safetensors").exists():
            (cache / f"features-{n}.pt").unlink()  # 1 GB each; the checkpoints are what is reused
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", required=True, type=Path, help="the folder benchmarks/data/caltech101.py wrote")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--views", type=int, default=2, help="augmented crops cached per training image")
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--patience", type=int, default=2, help="epochs without a better selection top-1 before stopping")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the blocks (5x for the classifier)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for role in ("train", "selection"):
        if not (args.split / role).is_dir():
            print(f"error: {args.split / role} is missing; run benchmarks/data/caltech101.py first", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    record = setup(args.split, args.cache, views=args.views, max_epochs=args.max_epochs, patience=args.patience,
                   lr=args.lr)
    for n, m in record["models"].items():
        print(f"{n}: {m['model']} at {m['input_size']} px, selection top-1 {100 * m['selection_top1']:.1f} % "
              f"(epoch {m['best_epoch']} of {m['epochs_run']}), {m['cpu_minutes']:.1f} CPU-min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
