"""Block-level distillation: train every alternative to mimic its teacher segment, then profile it.

The teacher is frozen. Alternatives are trained in *bunches*: each step runs one teacher forward
pass that returns the activations at every cut point the bunch needs
(:meth:`bespoke.partition.Partition.activations`), and every alternative in the bunch takes its
segment's input activation and is trained against the segment's output activation, with the loss
of the selected distill-loss plugin. One optimiser steps all alternatives of a bunch at once
(per-parameter Adam, so results do not depend on who else is in the bunch).

- **Activation cache**: with ``cache_activations`` the first epoch keeps the teacher activations
  the bunch needs (when they fit in :data:`CACHE_LIMIT_BYTES`), so later epochs skip the teacher.
- **Out of memory**: the bunch is halved and retried from the initial weights; an alternative that
  runs out of memory alone, or fails in any other way, is marked failed with the reason, and the
  run goes on.
- **Determinism**: data order and augmentation are seeded per epoch, independent of the bunch, and
  every alternative starts from the initial weights stored in the house. A bunch retrained after
  an interruption gives the same result, whoever shares it.
- **Profiling** (held-out images, after training): the distillation error (MSE normalised by the
  variance of the teacher activation) and the replace-one score: the teacher with only this
  alternative swapped in, i.e. the teacher up to the segment, the alternative, then the teacher's
  remaining part (equal to :func:`bespoke.student.assemble` with one choice, but reusing the
  teacher's head activations), scored by agreement with the teacher's top-1 and top-1 accuracy
  when labels exist.
- **Durability**: results (weights, then the manifest) are written after every bunch, so a kill
  loses at most the bunch in progress. Under ``torchrun`` the pending alternatives are shared
  out across ranks; each rank writes its results to its own shard file, and rank 0 merges them
  into the manifest (see :class:`DistEnv`).

One concern a module (each imports only those above it in this list):

- :mod:`~bespoke.distill.dist`: :class:`DistEnv`, this process's place in a ``torchrun`` launch.
- :mod:`~bespoke.distill.jobs`: :class:`Job`, :class:`Settings`, the bunch's Adam and each job's
  share of its state, out-of-memory helpers (:func:`is_oom`, :class:`BunchOutOfMemory`).
- :mod:`~bespoke.distill.stream`: :class:`Stream`, the seeded stream of training images.
- :mod:`~bespoke.distill.training`: :func:`train_bunch`, one bunch trained along the stream.
- :mod:`~bespoke.distill.profiling`: :func:`profile_bunch`, :class:`Tails`, :class:`Profile`.
- :mod:`~bespoke.distill.halving`: the rounds (:func:`plan_rounds`), :func:`halving_stops`,
  the image caps.
- :mod:`~bespoke.distill.driver`: :func:`distill_house` (:class:`HouseDistiller`), the whole house.
- :mod:`~bespoke.distill.table`: :func:`summary_table`, :data:`HOUSE_LEGEND`.
- :mod:`~bespoke.distill.build_helpers`: :func:`source_for`, :func:`calibration_batch`,
  :func:`teacher_top1`, for the build stage.

Everything public is re-exported here: ``from bespoke.distill import train_bunch``. Patch a name
where it is used (``bespoke.distill.training._optimizer``), not here.
"""

from __future__ import annotations

from bespoke.distill.build_helpers import calibration_batch, source_for, teacher_top1
from bespoke.distill.dist import DistEnv
from bespoke.distill.driver import DistillReport, HouseDistiller, distill_house
from bespoke.distill.halving import halving_stops, image_cap_stops, plan_rounds
from bespoke.distill.jobs import CACHE_LIMIT_BYTES, BunchOutOfMemory, Job, Settings, is_oom, optimizer_state
from bespoke.distill.profiling import Profile, TeacherScore, Tails, profile_bunch
from bespoke.distill.stream import Stream, _steps
from bespoke.distill.table import HOUSE_LEGEND, summary_table
from bespoke.distill.training import train_bunch

__all__ = [
    "BunchOutOfMemory", "CACHE_LIMIT_BYTES", "DistEnv", "DistillReport", "HOUSE_LEGEND", "HouseDistiller", "Job",
    "Profile", "Settings", "Stream", "TeacherScore", "Tails", "calibration_batch", "distill_house",
    "halving_stops", "image_cap_stops", "is_oom", "optimizer_state", "plan_rounds", "profile_bunch",
    "source_for", "summary_table", "teacher_top1", "train_bunch", "_steps",
]
