"""The model house: every alternative for a teacher's segments, trained once, on disk.

Layout of a house directory::

    manifest.json              # Manifest (pydantic, schema_version), written atomically
    alts/<id>.safetensors      # trained weights of alternative <id>
    alts/<id>.init.safetensors # its initial weights (training always starts here, so a
                               # retrained bunch after a kill gives the same result)
    shards/rank-<r>.json       # per-rank results while a torchrun build runs (merged, then removed)
    states/<id>.pt             # an alternative's training state while it trains (weights, Adam
    states/<id>.json           # state, position in the image stream; removed when it finishes)
    states/<id>.best-<step>.safetensors  # its weights at the round's end that scored best so far

The manifest holds no code: an alternative is rebuilt by its block source's ``rebuild`` from the
stored :class:`bespoke.types.AlternativeSpec`, then its safetensors weights are loaded.
"""

from __future__ import annotations

import json
import re
from glob import escape as glob_escape
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bespoke.errors import UsageError
from bespoke.files import atomic_write, atomic_write_text
from bespoke.types import AlternativeSpec, SegmentInfo

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

HOUSE_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

Status = Literal["pending", "trained", "failed"]


class TeacherInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    weights: str | None = None  # what load_model was given ("auto", "packaged", a path, ...)
    input_size: int
    params: int = 0
    flops: int = 0
    num_cut_points: int = 0
    val_top1: float | None = None  # on the held-out images, when labelled
    num_classes: int | None = None  # its classifier's classes, when not its architecture's default (fine-tuned)


class SegmentRecord(SegmentInfo):
    """A sampled segment, with the teacher segment's own cost."""

    params: int = 0
    flops: int = 0


class AlternativeRecord(BaseModel):
    """One alternative: what it is, what it costs, how training and profiling went."""

    model_config = ConfigDict(extra="forbid")

    id: str
    segment: str  # SegmentInfo.id
    source: str  # block-source plugin name
    spec: AlternativeSpec
    params: int = 0
    flops: int = 0  # per image, at the teacher's input size (FLOPs, not MACs)
    status: Status = "pending"
    reason: str | None = None  # why it failed
    # training
    train_loss: float | None = None  # mean loss over the last epoch
    steps: int = 0
    # profiling on held-out images
    distill_error: float | None = None  # MSE / variance of the teacher activation
    agreement: float | None = None  # replace-one: agreement with the teacher's top-1
    top1: float | None = None  # replace-one: top-1 accuracy, when labels exist
    kl: float | None = None  # replace-one: mean KL(teacher || teacher with this swapped in), nats
    # run-dependent, not part of the result
    seconds: float | None = None
    images: int = 0  # training images it saw (with repeats over epochs)
    stopped: str | None = None  # why successive halving stopped its training early
    kept: str | None = None  # when its weights are from an earlier round that scored better (keep-best)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = HOUSE_SCHEMA_VERSION
    teacher: TeacherInfo
    segments: list[SegmentRecord] = Field(default_factory=list)
    alternatives: list[AlternativeRecord] = Field(default_factory=list)
    # "<segment id>/<source>" pairs whose alternatives have all been created (creation resumes)
    proposed: list[str] = Field(default_factory=list)
    build: dict[str, Any] = Field(default_factory=dict)  # the build settings that made it
    data: dict[str, Any] = Field(default_factory=dict)  # data source, image counts, skipped
    updated: str = ""


def alternative_id(segment: SegmentInfo, spec: AlternativeSpec, taken: Iterable[str] = ()) -> str:
    """A stable, file-name-safe id: ``<segment>.<source>.<label>`` (suffixed if taken)."""
    raw = f"{segment.id}.{spec.source}.{spec.label or spec.kind}"
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("_")
    taken = set(taken)
    out, n = base, 2
    while out in taken:
        out, n = f"{base}-{n}", n + 1
    return out


def _flops(module: "nn.Module", in_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass at batch 1; 0 (unknown) when they cannot be counted."""
    from bespoke.counting import count_flops  # torch, loaded only when a house is filled

    return int(count_flops(module, (1, *tuple(in_shape)[1:])) or 0)


class House:
    """A model house directory and its manifest."""

    def __init__(self, root: str | Path, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest

    # ---- opening and saving -------------------------------------------------------------

    @staticmethod
    def exists(root: str | Path) -> bool:
        return (Path(root) / MANIFEST).is_file()

    @classmethod
    def create(cls, root: str | Path, teacher: TeacherInfo, **fields: Any) -> "House":
        root = Path(root)
        if cls.exists(root):
            raise UsageError(f"{str(root / MANIFEST)!r} already exists; open it instead of creating a house there")
        house = cls(root, Manifest(teacher=teacher, **fields))
        (root / "alts").mkdir(parents=True, exist_ok=True)
        house.save()
        return house

    @classmethod
    def open(cls, root: str | Path) -> "House":
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise UsageError(f"{str(path)!r} does not exist: {str(root)!r} is not a model house; "
                             f"build one with `bespoke build --out {root}`")
        return cls(Path(root), read_manifest(path))

    def save(self) -> None:
        self.manifest.updated = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(self.root / MANIFEST, self.manifest.model_dump_json(indent=1) + "\n")

    def check_teacher(self, name: str, input_size: int) -> None:
        """Resuming is only for the same teacher at the same input size."""
        t = self.manifest.teacher
        if t.name != name or t.input_size != input_size:
            raise UsageError(f"the model house {str(self.root)!r} was built for {t.name!r} at "
                             f"{t.input_size}px, not {name!r} at {input_size}px; give another "
                             f"--out directory, or delete this one to rebuild it")

    # ---- lookups ------------------------------------------------------------------------

    def segment(self, segment_id: str) -> SegmentRecord:
        for s in self.manifest.segments:
            if s.id == segment_id:
                return s
        raise KeyError(segment_id)

    def alternative(self, alt_id: str) -> AlternativeRecord:
        for a in self.manifest.alternatives:
            if a.id == alt_id:
                return a
        raise UsageError(f"the model house {str(self.root)!r} has no alternative {alt_id!r}")

    def by_status(self, status: Status) -> list[AlternativeRecord]:
        return [a for a in self.manifest.alternatives if a.status == status]

    def update(self, record: AlternativeRecord) -> None:
        """Replace the record with the same id (results of training or profiling)."""
        alts = self.manifest.alternatives
        for i, a in enumerate(alts):
            if a.id == record.id:
                alts[i] = record
                return
        alts.append(record)

    # ---- weights ------------------------------------------------------------------------

    def weights_path(self, alt_id: str, initial: bool = False) -> Path:
        return self.root / "alts" / (f"{alt_id}.init.safetensors" if initial else f"{alt_id}.safetensors")

    def save_weights(self, alt_id: str, module: "nn.Module", initial: bool = False) -> None:
        """Write the module's state as safetensors, atomically (temp file, fsync, rename)."""
        from safetensors.torch import save_model

        # save_model copies tensors to the CPU and drops tied duplicates
        atomic_write(self.weights_path(alt_id, initial), lambda tmp: save_model(module, tmp))

    def load_weights(self, alt_id: str, module: "nn.Module", initial: bool = False) -> "nn.Module":
        from safetensors.torch import load_model

        path = self.weights_path(alt_id, initial)
        if not path.is_file():
            raise UsageError(f"weights {str(path)!r} of alternative {alt_id!r} are missing; "
                             f"rerun `bespoke build` on this house to recreate them")
        try:
            load_model(module, str(path), strict=True, device=_device_of(module))
        except Exception as exc:
            raise UsageError(f"weights {str(path)!r} do not fit alternative {alt_id!r} "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None
        return module

    def load_alternative(self, alt_id: str, ctx: Any, source: Any, *, initial: bool = False) -> "nn.Module":
        """Rebuild alternative ``alt_id`` through its block source and load its weights.

        ``source`` is the block-source object (``registry.block_source(record.source, ...)``);
        ``ctx`` the :class:`bespoke.blocks.Context` of the teacher.
        """
        rec = self.alternative(alt_id)
        seg = self.segment(rec.segment)
        module = source.rebuild(ctx, SegmentInfo(**_segment_fields(seg)), rec.spec)
        return self.load_weights(alt_id, module, initial=initial)

    def remove_initial(self, alt_id: str) -> None:
        try:
            self.weights_path(alt_id, initial=True).unlink()
        except OSError:
            pass

    # ---- training states (resume inside an epoch) ---------------------------------------

    def state_path(self, alt_id: str, tag: str | None = None) -> Path:
        """``states/<id>.json`` (the state's description), or with ``tag`` its tensors file."""
        return self.root / "states" / (f"{alt_id}.json" if tag is None else f"{alt_id}.{tag}.pt")

    def save_state(self, alt_id: str, tensors: dict[str, Any], info: dict[str, Any]) -> None:
        """Write an alternative's training state: ``tensors`` (weights, optimiser state) to a new
        file, then ``info`` (JSON: position, counters, interim profile) naming it, both atomically,
        then remove the older tensors file. A kill at any moment leaves the last complete state."""
        import torch

        tag = f"{int(info.get('position', 0)):08d}"
        atomic_write(self.state_path(alt_id, tag), lambda tmp: torch.save(tensors, tmp))
        atomic_write_text(self.state_path(alt_id), json.dumps({**info, "tensors": tag}) + "\n")
        for old in self._state_files(alt_id):
            if old.name != self.state_path(alt_id, tag).name:
                try:
                    old.unlink()
                except OSError:
                    pass

    def _state_files(self, alt_id: str) -> list[Path]:
        pattern = re.compile(re.escape(alt_id) + r"\.\d{8}\.pt")
        return [p for p in self.state_path(alt_id).parent.glob(f"{glob_escape(alt_id)}.*.pt")
                if pattern.fullmatch(p.name)]

    def state_info(self, alt_id: str) -> dict[str, Any] | None:
        """The JSON half of a saved training state, or None (absent or unreadable)."""
        try:
            info = json.loads(self.state_path(alt_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def load_state(self, alt_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(tensors, info)`` of the last complete training state, or None (none, or unreadable)."""
        import torch

        info = self.state_info(alt_id)
        if info is None or not isinstance(info.get("tensors"), str):
            return None
        try:
            return torch.load(self.state_path(alt_id, info["tensors"]), map_location="cpu", weights_only=True), info
        except Exception:
            return None

    def best_path(self, alt_id: str, step: int) -> Path:
        return self.root / "states" / f"{alt_id}.best-{int(step):08d}.safetensors"

    def _best_files(self, alt_id: str) -> list[Path]:
        pattern = re.compile(re.escape(alt_id) + r"\.best-\d{8}\.safetensors")
        return [p for p in (self.root / "states").glob(f"{glob_escape(alt_id)}.best-*.safetensors")
                if pattern.fullmatch(p.name)]

    def save_best(self, alt_id: str, module: "nn.Module", step: int) -> None:
        """Keep ``module``'s weights as the best so far (the caller then records ``step`` in the
        state's JSON; :meth:`prune_best` removes the others once it has)."""
        from safetensors.torch import save_model

        atomic_write(self.best_path(alt_id, step), lambda tmp: save_model(module, tmp))

    def prune_best(self, alt_id: str, keep: int | None) -> None:
        for path in self._best_files(alt_id):
            if keep is None or path != self.best_path(alt_id, keep):
                try:
                    path.unlink()
                except OSError:
                    pass

    def load_best(self, alt_id: str, module: "nn.Module", step: int) -> bool:
        from safetensors.torch import load_model

        try:
            load_model(module, str(self.best_path(alt_id, step)), strict=True, device=_device_of(module))
            return True
        except Exception:
            return False

    def remove_state(self, alt_id: str) -> None:
        self.prune_best(alt_id, None)
        for path in [self.state_path(alt_id), *self._state_files(alt_id)]:
            try:
                path.unlink()
            except OSError:
                pass

    # ---- per-rank shards (torchrun) -----------------------------------------------------

    def shard_path(self, rank: int) -> Path:
        return self.root / "shards" / f"rank-{rank}.json"

    def write_shard(self, rank: int, records: list[AlternativeRecord]) -> None:
        payload = json.dumps([r.model_dump(mode="json") for r in records], indent=1)
        atomic_write_text(self.shard_path(rank), payload + "\n")

    def merge_shards(self) -> int:
        """Fold finished results of per-rank shard files into the manifest, save, remove them."""
        folder = self.root / "shards"
        if not folder.is_dir():
            return 0
        files = sorted(folder.glob("rank-*.json"))
        merged = 0
        for f in files:
            try:
                rows = json.loads(f.read_text(encoding="utf-8"))
                records = [AlternativeRecord.model_validate(r) for r in rows]
            except Exception:  # a shard is written atomically; an unreadable one is ignored
                continue
            known = {a.id for a in self.manifest.alternatives}
            for r in records:
                if r.id in known and r.status != "pending":
                    self.update(r)
                    merged += 1
                    if r.status == "trained":
                        self.remove_initial(r.id)
        if files:
            self.save()
            for f in files:
                try:
                    f.unlink()
                except OSError:
                    pass
        return merged


def _segment_fields(seg: SegmentInfo) -> dict[str, Any]:
    return {k: getattr(seg, k) for k in SegmentInfo.model_fields}


def segment_info(seg: SegmentInfo) -> SegmentInfo:
    """A plain :class:`SegmentInfo` from a :class:`SegmentRecord` (drops the cost fields)."""
    return SegmentInfo(**_segment_fields(seg))


def _device_of(module: "nn.Module") -> str:
    p = next(module.parameters(), None)
    if p is None:
        p = next(module.buffers(), None)
    return str(p.device) if p is not None else "cpu"


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; anything wrong is a UsageError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"the model house manifest {str(path)!r} is corrupted or unreadable "
                         f"({type(exc).__name__}: {exc}). Restore it, or delete the house "
                         f"directory and rebuild it with `bespoke build`") from None
    if isinstance(data, dict) and data.get("schema_version") not in (None, HOUSE_SCHEMA_VERSION):
        raise UsageError(f"the model house manifest {str(path)!r} has schema_version "
                         f"{data.get('schema_version')!r}; this bespoke reads version "
                         f"{HOUSE_SCHEMA_VERSION}. Rebuild the house, or use a matching bespoke")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
        raise UsageError(f"the model house manifest {str(path)!r} is corrupted: {where}: "
                         f"{first.get('msg')} ({exc.error_count()} problem(s)). Restore it, or "
                         f"delete the house directory and rebuild it with `bespoke build`") from None


# --------------------------------------------------------------------------------------------
# Filling a house
# --------------------------------------------------------------------------------------------


def stable_seed(seed: int, key: str) -> int:
    """A seed for ``key`` that does not depend on what ran before (so creation resumes exactly)."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**31)


def populate(house: House, partition: Any, ctx: Any, sources: dict[str, Any],
             segments: list[SegmentInfo], *, seed: int = 0,
             warn: Any = None, whole_sources: set[str] | None = None,
             offered: dict[str, set[str]] | None = None) -> list[AlternativeRecord]:
    """Ask every source for alternatives of every segment; create them; store them as pending.

    ``whole_sources``: when given, only these sources are asked for the whole-network segment
    (first cut point to last: image to logits; ``build.whole_sources``). ``offered``: segment id
    -> the only sources asked for that segment (the stitched segments, ``build.stitch_sources``).

    Creation resumes: each (segment, source) pair is recorded in ``manifest.proposed`` once all
    its alternatives are stored, so a rerun skips it. Each pair is seeded on its own. Returns the
    records added. ``warn(message)`` reports a source that failed to propose.
    """
    import torch

    from bespoke.counting import count_params
    from bespoke.errors import NotImplementedYet

    added: list[AlternativeRecord] = []
    have = {s.id for s in house.manifest.segments}
    for seg in segments:
        if seg.id not in have:
            extracted = partition.extract(seg)
            house.manifest.segments.append(SegmentRecord(
                **_segment_fields(seg), params=count_params(extracted),
                flops=_flops(extracted, seg.in_shape)))
            have.add(seg.id)
    house.save()
    done = set(house.manifest.proposed)
    for seg in segments:
        seg = segment_info(seg)
        whole = partition.is_whole(seg)
        for name, source in sources.items():
            key = f"{seg.id}/{name}"
            if key in done or (whole and whole_sources is not None and name not in whole_sources) \
                    or (offered and seg.id in offered and name not in offered[seg.id]):
                continue
            torch.manual_seed(stable_seed(seed, key))
            try:
                specs = list(source.propose(ctx, seg))
            except NotImplementedYet:
                raise
            except Exception as exc:
                if warn:
                    warn(f"block source {name!r} failed to propose for segment {seg.id}: "
                         f"{type(exc).__name__}: {str(exc)[:200]}")
                specs = []
            taken = {a.id for a in house.manifest.alternatives}
            for spec in specs:
                aid = alternative_id(seg, spec, taken)
                taken.add(aid)
                try:
                    module, full = source.create(ctx, seg, spec)
                    module.eval()
                    house.save_weights(aid, module, initial=True)
                    rec = AlternativeRecord(id=aid, segment=seg.id, source=name, spec=full,
                                            params=count_params(module),
                                            flops=_flops(module, seg.in_shape))
                except NotImplementedYet:
                    raise
                except Exception as exc:
                    lines = str(exc).strip().splitlines()
                    rec = AlternativeRecord(id=aid, segment=seg.id, source=name, spec=spec,
                                            status="failed",
                                            reason=f"create failed: {type(exc).__name__}: "
                                                   f"{(lines[0] if lines else '')[:300]}")
                house.update(rec)
                added.append(rec)
            house.manifest.proposed.append(key)
            done.add(key)
            house.save()
    return added
