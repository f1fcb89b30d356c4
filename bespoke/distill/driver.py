"""The whole house (:func:`distill_house`): train and profile every pending alternative, in bunches
and rounds, durably.

:class:`HouseDistiller` holds one call's state (the house, this rank's alternatives and their
saved states, the rounds, the queue of bunches, the finished records) and does it step by step:
plan the rounds, run each round's bunches (make the jobs, train, profile, save, commit), halve a
bunch that ran out of memory, finish an alternative (keep-best) and stop those that successive
halving or an image cap names.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from bespoke.data import ImageSet
from bespoke.distill.dist import DistEnv
from bespoke.distill.halving import halving_stops, image_cap_stops, plan_rounds
from bespoke.distill.jobs import BunchOutOfMemory, Job, Settings, _free_memory, _reason, optimizer_state
from bespoke.distill.profiling import Profile, TeacherScore, Tails, profile_bunch
from bespoke.distill.stream import Stream
from bespoke.distill.training import train_bunch
from bespoke.house import AlternativeRecord, House, segment_info


@dataclass
class DistillReport:
    trained: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    images_per_second: float = 0.0  # training only (teacher forward + every alternative's step)
    seconds: float = 0.0
    teacher: TeacherScore = field(default_factory=TeacherScore)
    stopped: list[str] = field(default_factory=list)  # trained, stopped early by successive halving


def distill_house(house: House, partition: Any, make_module: Callable[[AlternativeRecord], nn.Module],
                  train: ImageSet, val: ImageSet, loss_fn: Callable, settings: Settings, *,
                  bunch_size: int = 64, dist: DistEnv | None = None, console: Any = None
                  ) -> DistillReport:
    """Train and profile every pending alternative of ``house`` (this rank's share of them).

    ``make_module(record)`` rebuilds an alternative with its *initial* weights. Finished results
    are written after every bunch: to the manifest in a single process, to this rank's shard file
    under ``torchrun`` (rank 0 merges the shards at the end; see :meth:`House.merge_shards`).
    While a bunch trains, each alternative's training state is saved every
    ``settings.checkpoint_minutes`` (:meth:`House.save_state`), so a killed build resumes where
    its alternatives were in the image stream. With ``settings.halving`` the stream is cut into
    rounds (:meth:`Stream.rounds`); after each, every alternative still training is profiled on
    the held-out images and those :func:`halving_stops` names stop, trained as far as they got.
    """
    return HouseDistiller(house, partition, make_module, train, val, loss_fn, settings,
                          bunch_size=bunch_size, dist=dist, console=console).run()


class HouseDistiller:
    """One call of :func:`distill_house`."""

    def __init__(self, house: House, partition: Any, make_module: Callable[[AlternativeRecord], nn.Module],
                 train: ImageSet, val: ImageSet, loss_fn: Callable, settings: Settings, *,
                 bunch_size: int = 64, dist: DistEnv | None = None, console: Any = None):
        self.house, self.partition, self.make_module = house, partition, make_module
        self.train, self.val, self.loss_fn, self.settings = train, val, loss_fn, settings
        self.bunch_size, self.console = bunch_size, console
        self.dist = dist or DistEnv()
        self.report = DistillReport()
        self.halving = bool(settings.halving and settings.epochs)
        self.mine = self._my_share()
        self.finished: list[AlternativeRecord] = []
        self.queue: deque[list[AlternativeRecord]] = deque()
        self.total_images = 0
        self.train_seconds = 0.0
        self.bunch_no = 0

    def _my_share(self) -> list[AlternativeRecord]:
        """This rank's pending alternatives."""
        dist = self.dist
        pending = [a for a in self.house.manifest.alternatives if a.status == "pending"]
        if self.halving and dist.world > 1:  # a segment's alternatives on one rank: halving compares them
            seg_rank = {s.id: i % dist.world for i, s in enumerate(self.house.manifest.segments)}
            return [a for a in pending if seg_rank.get(a.segment, 0) == dist.rank]
        return pending[dist.rank::dist.world]

    def run(self) -> DistillReport:
        if not self.mine:
            return self.report
        self._prepare()
        with self.progress:
            for r, bound in enumerate(self.bounds):
                self._round(r, bound)
        report, finished = self.report, self.finished
        report.seconds = time.perf_counter() - self.t_start
        report.images_per_second = self.total_images / self.train_seconds if self.train_seconds else 0.0
        report.trained = [r.id for r in finished if r.status == "trained"]
        report.failed = [r.id for r in finished if r.status == "failed"]
        report.stopped = [r.id for r in finished if r.stopped]
        return report

    def _prepare(self) -> None:
        """Freeze the teacher, plan the rounds, read the saved states, say where training resumes."""
        settings, console = self.settings, self.console
        for p in self.partition.model.parameters():  # the teacher is frozen
            p.requires_grad_(False)
        self.teacher_params = {id(p) for p in self.partition.model.parameters()}
        self.tails = Tails(self.partition)
        self.stream = stream = Stream.of(len(self.train), settings)
        self.bounds, self.halving_bounds = plan_rounds(stream, settings, self.mine, self.halving)
        self.info = {rec.id: self.house.state_info(rec.id) or {} for rec in self.mine}
        resumed = {k: v["position"] for k, v in self.info.items() if v.get("position")}
        self.show = console is not None and self.dist.main
        if self.show and resumed:
            console.print(f"resuming {len(resumed)} alternative(s) inside the image stream, at step(s) "
                          f"{', '.join(str(s) for s in sorted(set(resumed.values())))} of {stream.total}")
        self.live = list(self.mine)
        self.t_start = time.perf_counter()
        self.progress = self._make_progress()

    def _make_progress(self) -> Any:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from bespoke.console import progress as make_progress

        # no distillation epochs (the few-image recipe): nothing to show progress of but profiling
        return make_progress(self.console if self.show and self.settings.epochs else None,
                             TextColumn("[bold]{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4g}"),
                             TextColumn("{task.fields[ips]:.1f} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                             line="{description}: step {completed}/{total}, loss {loss:.4g}, {ips:.1f} img/s, "
                                  "{elapsed:.0f} s, {eta} left")

    # -- a round -------------------------------------------------------------------------------

    def _round(self, r: int, bound: int) -> None:
        """Train every live alternative up to step ``bound`` of the stream, in bunches, and profile
        it there; then stop those that halving or their image cap names."""
        final = bound == self.stream.total and r == len(self.bounds) - 1
        info = self.info
        todo = [rec for rec in self.live if final or info[rec.id].get("position", 0) < bound
                or info[rec.id].get("profiled_at") != bound]
        groups: dict[int, list[AlternativeRecord]] = {}
        for rec in todo:
            groups.setdefault(int(info[rec.id].get("position", 0)), []).append(rec)
        size = max(1, min(self.bunch_size, len(todo) or 1))
        self.queue = deque(g[i:i + size] for _, g in sorted(groups.items()) for i in range(0, len(g), size))
        while self.queue:
            self._bunch(r, bound, final, self.queue.popleft())
        if final or not self.live:
            return
        self._stop(r, bound)

    def _bunch(self, r: int, bound: int, final: bool, bunch: list[AlternativeRecord]) -> None:
        """Train one bunch up to ``bound``, profile it, save it; halve it when out of memory."""
        settings, dist = self.settings, self.dist
        self.bunch_no += 1
        jobs, done = self._make_jobs(bunch)
        halving, bounds = self.halving, self.bounds
        rounds_left = f"round {r + 1 - bool(halving)}/{len(bounds) - bool(halving)} " if halving and bound else ""
        label = (f"{rounds_left}bunch {self.bunch_no} ({len(jobs)} alt.)"
                 + (f" rank {dist.rank}" if dist.world > 1 else ""))
        trains = bool(jobs) and (bound > jobs[0].position or final)
        progress = self.progress
        task = progress.add_task(label, total=None, loss=float("nan"), ips=0.0) if trains else None
        started = time.perf_counter()

        def on_step(step: int, total: int, loss: float, ips: float, _task=task) -> None:
            progress.update(_task, completed=step, total=total, loss=loss, ips=ips)

        try:
            if trains:
                self.total_images += train_bunch(self.partition, jobs, self.train, self.loss_fn, settings, on_step,
                                                 stop=bound, checkpoint=self._save_states)
                self.train_seconds += time.perf_counter() - started
        except BunchOutOfMemory as exc:
            del jobs
            _free_memory(settings.device)
            if task is not None:
                progress.remove_task(task)
            self._out_of_memory(bunch, done, exc)
            return
        self._profile_and_commit(jobs, done, bound, final, started)
        del jobs
        _free_memory(settings.device)

    def _make_jobs(self, bunch: list[AlternativeRecord]) -> tuple[list[Job], list[AlternativeRecord]]:
        """The bunch's jobs, and the records of those that could not be rebuilt (failed). Jobs
        whose saved state could not be read start again, in a bunch of their own, queued."""
        jobs: list[Job] = []
        done: list[AlternativeRecord] = []
        for rec in bunch:
            try:
                jobs.append(self._make_job(rec))
            except Exception as exc:
                done.append(rec.model_copy(update={"status": "failed",
                                                   "reason": f"could not rebuild: {_reason(exc)}"}))
        positions = {j.position for j in jobs}
        if len(positions) > 1:  # a saved state that could not be read: start those again
            late = [j.record for j in jobs if j.position != max(positions)]
            for rec in late:
                self.house.remove_state(rec.id)
                self.info[rec.id] = {}
            self.queue.append(late)
            jobs = [j for j in jobs if j.position == max(positions)]
        return jobs, done

    def _make_job(self, rec: AlternativeRecord) -> Job:
        """A job for ``rec``: its module rebuilt with its initial weights, its saved state put back."""
        module = self.make_module(rec)
        if any(id(p) in self.teacher_params for p in module.parameters()):
            module = copy.deepcopy(module)  # never train the teacher's own weights
        job = Job(rec, segment_info(self.house.segment(rec.segment)), module)
        saved = self.house.load_state(rec.id) if self.info.get(rec.id) else None
        if saved is not None:
            job.restore(*saved)
        return job

    def _out_of_memory(self, bunch: list[AlternativeRecord], done: list[AlternativeRecord],
                       exc: BunchOutOfMemory) -> None:
        """A bunch ran out of memory: alone, the alternative fails; else the bunch and the rest of
        the round's queue go on in bunches half as large, from their saved states."""
        house, settings = self.house, self.settings
        if len(bunch) == 1:
            house.remove_state(bunch[0].id)
            done.append(bunch[0].model_copy(update={
                "status": "failed",
                "reason": f"out of memory even when trained alone at batch size "
                          f"{settings.batch_size}; lower build.batch_size ({str(exc)[:200]})"}))
            self.live = [rec for rec in self.live if rec.id != bunch[0].id]
            _commit(house, done, self.finished, self.dist)
            return
        half = max(1, len(bunch) // 2)
        rest = [rec for b in [bunch, *self.queue] for rec in b]
        by_pos: dict[int, list[AlternativeRecord]] = {}
        for rec in rest:  # the halved bunches resume from their saved states
            self.info[rec.id] = house.state_info(rec.id) or {}
            by_pos.setdefault(int(self.info[rec.id].get("position", 0)), []).append(rec)
        self.queue = deque(g[i:i + half] for _, g in sorted(by_pos.items()) for i in range(0, len(g), half))
        if self.console is not None:
            self.console.print(f"[yellow]out of memory with {len(bunch)} alternatives in a bunch; "
                               f"retrying in bunches of {half}[/yellow]")

    def _profile_and_commit(self, jobs: list[Job], done: list[AlternativeRecord], bound: int, final: bool,
                            started: float) -> None:
        """Profile a trained bunch; at a round's end save its states, at the stream's end finish
        it; write the finished records (failed ones too)."""
        settings, house = self.settings, self.house
        for j in jobs:
            j.module.to(settings.device).eval()
        profiles, teacher_score = profile_bunch(self.partition, jobs, self.val, self.tails, settings)
        if teacher_score.images:
            self.report.teacher = teacher_score
        elapsed = time.perf_counter() - started
        if not final:  # the round's end: profiled, saved, on to the next round (or stopped)
            for j in jobs:
                prof = profiles.get(j.record.id)
                # halving's stall test compares its rounds: a cap's extra round is not one
                if prof is not None and prof.kl is not None and bound in self.halving_bounds:
                    j.kl_history.append(prof.kl)
            self._save_states(jobs, profiles=profiles, at=bound)
            for j in jobs:
                self.info[j.record.id] = house.state_info(j.record.id) or {}
        for j in jobs:
            rec = j.record
            if j.failed is not None:
                done.append(rec.model_copy(update={"status": "failed", "reason": j.failed,
                                                   "steps": j.steps, "images": j.images}))
                continue
            if final:
                done.append(self._finish(j, profiles.get(rec.id, Profile()), elapsed / max(1, len(jobs))))
        self._commit_done(done)

    def _commit_done(self, done: list[AlternativeRecord]) -> None:
        """Write ``done``, drop their saved states, and take them off the live alternatives."""
        _commit(self.house, done, self.finished, self.dist)
        for rec in done:
            self.house.remove_state(rec.id)
        gone = {rec.id for rec in done}
        self.live = [rec for rec in self.live if rec.id not in gone]

    # -- saving and finishing ------------------------------------------------------------------

    def _save_states(self, jobs: list[Job], opt: Any = None, profiles: dict[str, Profile] | None = None,
                     at: int | None = None) -> None:
        """Save the jobs' training states; at a round's end (``at``) with their profiles, and the
        weights of the best round's end so far (keep-best)."""
        house = self.house
        for j in jobs:
            if j.failed is not None:
                continue
            state = optimizer_state(opt, j) if opt is not None else (j.optim_state or [])
            extra = {}
            if at is not None:
                prof = (profiles or {}).get(j.record.id, Profile())
                extra = {"profiled_at": at, "profile": prof.__dict__}
                if prof.kl is not None and (j.best is None or prof.kl < j.best["kl"]):  # keep-best
                    house.save_best(j.record.id, j.module, at)
                    j.best = {"step": at, "kl": prof.kl, "images": j.images, "profile": prof.__dict__}
            house.save_state(j.record.id, {"module": j.module.state_dict(), "optim": state}, j.info() | extra)
            if at is not None and j.best is not None:
                house.prune_best(j.record.id, j.best["step"])

    def _finish(self, job: Job, prof: Profile, seconds: float | None, stopped: str | None = None
                ) -> AlternativeRecord:
        """Save a job's weights and give its finished record: the weights of the round's end that
        scored best on the held-out images when one scored better than the last (keep-best)."""
        kept = None
        best = job.best
        if (best is not None and prof.kl is not None and best["kl"] < prof.kl
                and self.house.load_best(job.record.id, job.module, best["step"])):
            kept = (f"the weights after {best['images']:,} images (KL {best['kl']:.3g}; "
                    f"{prof.kl:.3g} after {job.images:,})")
            prof = Profile(**best["profile"])
        self.house.save_weights(job.record.id, job.module)
        return _trained(job.record, job, prof, seconds, stopped=stopped, kept=kept)

    def _stop(self, r: int, bound: int) -> None:
        """After a round: finish the alternatives that halving or their image cap stops."""
        info, settings, bounds = self.info, self.settings, self.bounds
        profiled = [rec for rec in self.live if info[rec.id].get("profiled_at") == bound]
        # successive halving: stop the alternatives clearly not worth more images
        stops = (halving_stops(self.house, profiled, info, settings, first=bound == 0)
                 if bound in self.halving_bounds else {})
        stops = image_cap_stops(profiled, info, stops)  # and those at their image cap
        if not stops and bound not in self.halving_bounds:
            return
        done = []
        for rec in self.live:
            if rec.id not in stops:
                continue
            job = self._make_job(rec)
            done.append(self._finish(job, Profile(**(info[rec.id].get("profile") or {})), None,
                                     stopped=stops[rec.id]))
        _commit(self.house, done, self.finished, self.dist)
        for rec in done:
            self.house.remove_state(rec.id)
        self.live = [rec for rec in self.live if rec.id not in stops]
        if self.show:
            images = min(bound * settings.batch_size, self.stream.total * settings.batch_size)
            nxt = bounds[r + 1] * settings.batch_size if r + 1 < len(bounds) else None
            self.console.print(f"{'halving' if bound in self.halving_bounds else 'image caps'} after {images:,} "
                               f"images: {len(stops)} stopped, {len(self.live)} go on"
                               + (f" to {nxt:,}" if nxt else ""), highlight=False)


def _trained(rec: AlternativeRecord, job: Job, prof: Profile, seconds: float | None,
             stopped: str | None = None, kept: str | None = None) -> AlternativeRecord:
    return rec.model_copy(update={
        "status": "trained", "reason": None, "train_loss": job.train_loss, "steps": job.steps,
        "images": job.images, "stopped": stopped, "kept": kept,
        "distill_error": prof.distill_error, "kl": prof.kl,
        "agreement": prof.agreement, "top1": prof.top1,
        "seconds": None if seconds is None else round(seconds, 4)})


def _commit(house: House, done: list[AlternativeRecord], finished: list[AlternativeRecord],
            dist: DistEnv) -> None:
    """Make a bunch's results durable: weights are already written; now the records."""
    finished.extend(done)
    if dist.world > 1:
        house.write_shard(dist.rank, finished)
        return
    for rec in done:
        house.update(rec)
    house.save()
    for rec in done:
        if rec.status == "trained":
            house.remove_initial(rec.id)


__all__ = ["DistillReport", "HouseDistiller", "distill_house"]
