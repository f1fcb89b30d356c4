"""Evaluation of a model (teacher, student, reference): accuracy, agreement, size, latency.

- ``top1`` / ``top5``: against labels, only when the data set is labelled (else ``None``).
- ``agreement``: the fraction of images on which the model's top-1 equals the teacher's top-1;
  it needs no labels, so it is the accuracy proxy on unlabelled data (the teacher scores 1.0).
- ``params``, ``flops`` (torch's FLOP counter, one image).
- latency: measured end to end by the selected latency estimator, for every model in *one*
  call (:func:`measure_latencies`) so measuring estimators interleave them and drift hits all
  alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bespoke.counting import count_flops, count_params
from bespoke.finetune import iter_batches


@dataclass
class Predictions:
    top5: torch.Tensor  # (N, 5) class indices, best first
    labels: torch.Tensor  # (N,), -1 where unknown


@torch.no_grad()
def predict(model: nn.Module, dataset: Any, batch_size: int = 32, device: str = "cpu") -> Predictions:
    """Top-5 classes of ``model`` on every decodable image of ``dataset``, in order."""
    model.eval()
    tops, labels = [], []
    for x, y in iter_batches(dataset, batch_size):
        logits = model(x.to(device))
        k = min(5, logits.shape[-1])
        tops.append(logits.topk(k, dim=-1).indices.cpu())
        labels.append(y)
    if not tops:
        return Predictions(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    return Predictions(torch.cat(tops), torch.cat(labels))


def accuracy(pred: Predictions) -> tuple[float | None, float | None]:
    """(top-1, top-5) over labelled images; (None, None) when no image has a label."""
    mask = pred.labels >= 0
    if pred.labels.numel() == 0 or not bool(mask.all()):
        return None, None
    t5, y = pred.top5[mask], pred.labels[mask]
    top1 = (t5[:, 0] == y).float().mean().item()
    top5 = (t5 == y[:, None]).any(dim=1).float().mean().item()
    return top1, top5


def agreement(pred: Predictions, reference: Predictions) -> float | None:
    if pred.top5.shape[0] == 0 or pred.top5.shape[0] != reference.top5.shape[0]:
        return None
    return (pred.top5[:, 0] == reference.top5[:, 0]).float().mean().item()


@dataclass
class Metrics:
    name: str
    params: int
    flops: float | None
    top1: float | None
    top5: float | None
    agreement: float | None
    images: int
    latency_ms: float | None = None


def evaluate(model: nn.Module, name: str, dataset: Any, input_shape: Sequence[int], *,
             teacher: Predictions | None = None, batch_size: int = 32, device: str = "cpu",
             ) -> tuple[Metrics, Predictions]:
    """Accuracy, agreement with ``teacher`` (1.0 when ``teacher`` is None: this *is* the
    teacher), parameters and FLOPs. Latency is filled in by :func:`measure_latencies`."""
    pred = predict(model, dataset, batch_size, device)
    top1, top5 = accuracy(pred)
    agree = 1.0 if teacher is None else agreement(pred, teacher)
    return Metrics(name=name, params=count_params(model), flops=count_flops(model, input_shape),
                   top1=top1, top5=top5, agreement=agree, images=int(pred.top5.shape[0])), pred


def _queries(models: dict[str, nn.Module],
             input_shape: Sequence[int] | Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """One latency query per model (in eval mode), each a whole network as it ships
    (``as_shipped``): ``input_shape`` is one shape, or one per name."""
    from bespoke.latency import make_query
    from bespoke.types import LatencyQuery

    def shape_of(name):
        shape = input_shape[name] if isinstance(input_shape, Mapping) else input_shape
        return tuple(int(s) for s in shape)

    for m in models.values():
        m.eval()
    queries: dict[str, Any] = {}
    owner: dict[str, int] = {}  # query key -> the module object that has it
    for name, m in models.items():
        q = make_query(m, shape_of(name), as_shipped=True)
        if owner.setdefault(q.key, id(m)) != id(m):
            # the same architecture as another model here, but another module (a saved student
            # beside the network it came from): timed in its own right, not answered for the other
            q = LatencyQuery(key=f"{q.key}@{name}", input_shape=q.input_shape, module=q.module, as_shipped=True)
        queries[name] = q
    return queries


def measure_latencies(models: dict[str, nn.Module], input_shape: Sequence[int] | Mapping[str, Sequence[int]],
                      estimator: Any, fallback: Any = None) -> dict[str, float | None]:
    """End-to-end latency (ms) of each model with ``estimator``, all in one interleaved call.

    ``input_shape`` is one shape for all, or a shape per model name (models that run at other
    input sizes). A table-only estimator cannot answer for a whole new model; then ``fallback``
    (a measuring estimator) answers, and when there is none the latency is ``None``.
    """
    queries = _queries(models, input_shape)
    answers: dict[str, float] = {}
    for est in (estimator, fallback):
        missing = [q for n, q in queries.items() if q.key not in answers]
        if est is None or not missing:
            continue
        try:
            got = est.latencies(missing)
        except Exception:  # e.g. a lookup table that does not hold whole models
            continue
        answers.update({k: float(v) for k, v in got.items() if v is not None})
    return {name: answers.get(q.key) for name, q in queries.items()}


def measure_ratios(models: dict[str, nn.Module], input_shape: Sequence[int] | Mapping[str, Sequence[int]],
                   estimator: Any, fallback: Any = None, *, reference: str = "teacher",
                   pairwise: bool = False, intervals: dict[str, tuple[float, float]] | None = None,
                   repeats: int = 1) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Latency (ms) of each model and its ratio to ``models[reference]``, all in one interleaved
    call. Returns ``(ms, ratios)``.

    When the estimator that answers gives every timed run (``latency_samples``), a ratio is the
    median over rounds of the *paired* ratio within one round, so the machine's drift from round
    to round (seen here: the same model 35 ms in one call, 55 ms in the next) cancels; otherwise
    it is the ratio of the two medians. A model the estimator cannot time has ``None``.

    ``pairwise``: time each model in its own call beside the reference only, instead of all in
    one call. How many models one call interleaves changes the ratios (measured on this CPU: a
    student at 0.83 of the teacher in a pair, 0.84-0.86 in a call of five: each model runs with
    the others' weights in the caches), so ratios that are compared with each other -- a budget
    taken from a reference model, a re-ranked candidate, a final table -- are best all timed the
    same way; re-ranking times candidates in pairs. The reference's ms is then its median over
    all calls.

    A model given under two names (the teacher as the reference and again at another input
    size) is timed as a copy under the second name: one module object would share its weights
    in the caches with itself, which a student (its own weights) never does, and would come out
    cheaper than the same network with weights of its own.

    ``intervals``, when given, receives each model's 95 % interval of its ratio (a bootstrap of
    the median over the per-round paired ratios; only where timed runs are given): the noise a
    budget check must allow for.

    ``repeats``: the whole measurement is made this many times, one after the other (every model
    once per repetition, so slow drift touches them all alike), and each ratio and ms is the
    median over the repetitions. Measured on this CPU, two separate calls can put the same saved
    student 5-9 % apart (0.761 and 0.829) although each call's own interval is narrower: the
    state of one call (where the weights lie, what the caches hold) does not average out within
    it. A ratio that decides or checks a budget is therefore the median of several calls; its
    interval then spans the per-call ratios as well as the pooled rounds' bootstrap interval.
    """
    import statistics

    from bespoke.latency import per_round_means as _per_round

    if reference not in models:
        raise ValueError(f"measure_ratios: the reference {reference!r} is not among the models")
    if repeats < 1:
        raise ValueError(f"measure_ratios: repeats must be at least 1, got {repeats}")
    models = _own_weights(models, reference)
    if repeats > 1:
        return _repeated(models, input_shape, estimator, fallback, reference, pairwise, intervals, repeats)
    if pairwise and len(models) > 2:
        ms: dict[str, float | None] = {}
        ratios: dict[str, float | None] = {reference: 1.0}
        ref_ms: list[float] = []
        shape_of = (lambda n: input_shape[n]) if isinstance(input_shape, Mapping) else (lambda n: input_shape)
        for name, model in models.items():
            if name == reference:
                continue
            got_ms, got = measure_ratios({reference: models[reference], name: model},
                                         {reference: shape_of(reference), name: shape_of(name)},
                                         estimator, fallback, reference=reference, intervals=intervals)
            ms[name], ratios[name] = got_ms[name], got[name]
            if got_ms[reference] is not None:
                ref_ms.append(got_ms[reference])
        ms[reference] = float(statistics.median(ref_ms)) if ref_ms else None
        return {n: ms[n] for n in models}, {n: ratios[n] for n in models}

    queries = _queries(models, input_shape)
    for est in (estimator, fallback):
        if est is None or not callable(getattr(est, "latency_samples", None)):
            continue
        try:
            samples = est.latency_samples(list(queries.values()))
        except Exception:  # a lookup table that does not hold whole models: try the next one
            continue
        ref = samples.get(queries[reference].key)
        if not ref:
            continue
        ms: dict[str, float | None] = {}
        ratios: dict[str, float | None] = {}
        for name, q in queries.items():
            got = samples.get(q.key)
            if not got:
                ms[name] = ratios[name] = None
                continue
            rounds = min(len(ref), len(got))
            r_ref, r_got = _per_round(ref[:rounds], rounds), _per_round(got[:rounds], rounds)
            paired = [b / a for a, b in zip(r_ref, r_got) if a > 0]
            ms[name] = float(statistics.median(got))
            ratios[name] = float(statistics.median(paired))
            if intervals is not None and name != reference:
                intervals[name] = median_interval(paired)
        return ms, ratios
    ms = measure_latencies(models, input_shape, estimator, fallback)
    ref_ms = ms.get(reference)
    ratios = {n: (v / ref_ms if v is not None and ref_ms else None) for n, v in ms.items()}
    return ms, ratios


def _repeated(models, input_shape, estimator, fallback, reference, pairwise, intervals, repeats):
    """:func:`measure_ratios` made ``repeats`` times; medians over the repetitions, intervals
    spanning the per-call ratios and each call's own interval."""
    import statistics

    calls = []
    for _ in range(repeats):
        got_intervals: dict[str, tuple[float, float]] = {}
        ms, ratios = measure_ratios(models, input_shape, estimator, fallback, reference=reference,
                                    pairwise=pairwise, intervals=got_intervals)
        calls.append((ms, ratios, got_intervals))

    def median_of(values):
        values = [v for v in values if v is not None]
        return float(statistics.median(values)) if values else None

    ms = {n: median_of(c[0].get(n) for c in calls) for n in models}
    ratios = {n: median_of(c[1].get(n) for c in calls) for n in models}
    if intervals is not None:
        for name in models:
            bounds = [b for c in calls if name in c[2] for b in c[2][name]]
            bounds += [c[1][name] for c in calls if c[1].get(name) is not None]
            if name != reference and bounds and ratios[name] is not None:
                intervals[name] = (min(bounds), max(bounds))
    return ms, ratios


def _own_weights(models: dict[str, nn.Module], reference: str) -> dict[str, nn.Module]:
    """``models`` with every module object that already appeared under an earlier name (the
    reference first) replaced by a deep copy, so no two timed models share weights."""
    import copy

    seen: set[int] = set()
    out: dict[str, nn.Module] = {}
    for name in [reference, *[n for n in models if n != reference]]:
        model = models[name]
        if id(model) in seen:
            model = copy.deepcopy(model)
        seen.add(id(model))
        out[name] = model
    return {name: out[name] for name in models}


def proportion_interval(fraction: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95 % by default) of a proportion ``fraction`` seen on ``n`` items:
    what an agreement on a handful of images can and cannot say (1 of 7 images: 2.6-51 %)."""
    import math

    if n <= 0:
        return (0.0, 1.0)
    centre = (fraction + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(fraction * (1 - fraction) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def usability(agreement: float | None, images: int, threshold: float) -> tuple[bool | None, str | None]:
    """Whether a student that agrees with the teacher on ``agreement`` of ``images`` held-out
    images is worth keeping at ``threshold``: ``(False, why)`` when its whole 95 % interval is
    below the threshold, ``(None, why)`` when the images are too few to tell either way,
    ``(True, None)`` otherwise."""
    if agreement is None or images <= 0:
        return None, "no held-out images: its agreement with the teacher is unknown; give val_data"
    lo, hi = proportion_interval(agreement, images)
    said = f"agrees with the teacher on {100 * agreement:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] of {images} held-out images"
    if hi < threshold:
        return False, (f"{said}, surely below {100 * threshold:.0f} %: not worth keeping. Distil on more images "
                       "(--data DIR, a few thousand photos) or give a larger budget")
    if lo < threshold:
        return None, (f"{said}: too few images to tell whether it reaches {100 * threshold:.0f} %; "
                      "judge it on more held-out images (val_data)")
    return True, None


def median_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the median of ``values`` (fixed seed: the same runs give the same
    interval)."""
    import numpy as np

    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    medians = np.median(v[rng.integers(0, v.size, size=(resamples, v.size))], axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(medians, [tail, 1.0 - tail])
    return (float(lo), float(hi))


def over_budget(ratio: float | None, interval: tuple[float, float] | None, budget: float,
                tolerance: float = 0.0) -> bool:
    """Whether a model measured at ``ratio`` (95 % ``interval``) is over ``budget``: by more than
    ``tolerance`` (a relative margin), or above it by more than the measured noise (its whole
    interval above the budget)."""
    if ratio is None or ratio <= budget:
        return False
    return ratio > budget * (1.0 + tolerance) or (interval is not None and interval[0] > budget)


@dataclass
class PairedDifference:
    """``a``'s top-1 minus ``b``'s on the same images, with a paired-bootstrap interval."""

    diff: float  # top-1(a) - top-1(b), as a fraction
    low: float  # the interval's bounds, as fractions
    high: float
    only_a: int  # images only ``a`` gets right
    only_b: int  # images only ``b`` gets right
    images: int
    confidence: float

    def as_dict(self) -> dict[str, float | int]:
        return {"diff": self.diff, "low": self.low, "high": self.high, "only_a": self.only_a,
                "only_b": self.only_b, "images": self.images, "confidence": self.confidence}


def paired_difference(a: Predictions, b: Predictions, *, resamples: int = 10000, confidence: float = 0.95,
                      seed: int = 0) -> PairedDifference:
    """How much better ``a`` is than ``b`` on top-1 over the same labelled images, and how sure
    that is: the images are resampled with replacement (both models' answers on an image stay
    together), and the interval holds the central ``confidence`` of the resampled differences.
    On 300 images one image is 0.33 points and a 95 % interval is about +-2 points wide for two
    models that disagree on 10 % of the images: a difference inside it is not a difference.
    """
    if a.labels.shape != b.labels.shape or not torch.equal(a.labels, b.labels):
        raise ValueError("paired_difference needs both models' predictions on the same images, in the same order")
    mask = a.labels >= 0
    n = int(mask.sum())
    if n == 0:
        raise ValueError("paired_difference needs labelled images")
    return paired_flags(a.top5[mask, 0] == a.labels[mask], b.top5[mask, 0] == b.labels[mask],
                        resamples=resamples, confidence=confidence, seed=seed)


def paired_flags(right_a: torch.Tensor, right_b: torch.Tensor, *, resamples: int = 10000, confidence: float = 0.95,
                 seed: int = 0) -> PairedDifference:
    """:func:`paired_difference` of two models given, per image, whether each is right (two bool
    tensors over the same images, in the same order; "right" may mean "agrees with the teacher")."""
    if right_a.shape != right_b.shape or right_a.dim() != 1:
        raise ValueError("paired_flags needs one flag per image for both models, over the same images")
    n = int(right_a.numel())
    if n == 0:
        raise ValueError("paired_flags needs at least one image")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    d = right_a.float() - right_b.float()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    boot = d[idx].mean(dim=1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(boot, torch.tensor([tail, 1 - tail])).tolist()
    return PairedDifference(diff=float(d.mean()), low=float(low), high=float(high), only_a=int((d > 0).sum()),
                            only_b=int((d < 0).sum()), images=n, confidence=confidence)
