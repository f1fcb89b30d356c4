"""The model house as a table (:func:`summary_table`) and its legend (:data:`HOUSE_LEGEND`)."""

from __future__ import annotations

from typing import Any

from bespoke.house import House


HOUSE_LEGEND = ("params: millions; MFLOPs: per image; stopped: successive halving stopped its training (the "
                "reason is in the manifest); loss: mean distillation loss of the last epoch; err: "
                "held-out MSE over the variance of the teacher's activation; agree, top-1: the teacher with only "
                "this block swapped in, % of held-out images on which it agrees with the teacher / is right")


def summary_table(house: House, title: str = "model house") -> Any:
    """A table of every alternative: cost, status, training loss and profile (the legend,
    :data:`HOUSE_LEGEND`, goes under it)."""
    from bespoke.console import table as make_table

    table = make_table(title, ("alternative", "left"), "params", "MFLOPs", ("status", "left"), "loss", "err",
                       "agree", "top-1")  # an alternative's id names its segment and its source

    def num(v: float | None, fmt: str = "{:.3g}") -> str:
        return "-" if v is None else fmt.format(v)

    for a in house.manifest.alternatives:
        status = a.status if a.status != "failed" else f"failed: {(a.reason or '')[:60]}"
        if a.status == "trained" and a.stopped:
            status = f"stopped at {a.images:,} img." if a.images else "stopped untrained"
        table.add_row(a.id, f"{a.params / 1e6:.3f}", f"{a.flops / 1e6:.1f}", status,
                      num(a.train_loss), num(a.distill_error), num(a.agreement and 100 * a.agreement, "{:.1f}"),
                      num(a.top1 and 100 * a.top1, "{:.1f}"))
    return table


__all__ = ["HOUSE_LEGEND", "summary_table"]
