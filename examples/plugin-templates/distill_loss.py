"""A distillation loss: smooth L1 between the student's and the teacher's activations, with its
transition point as an option."""

import torch.nn.functional as F
from pydantic import Field

from bespoke.api import PluginOptions, PluginRecord, hookimpl


class SmoothL1Options(PluginOptions):
    beta: float = Field(1.0, gt=0, description="where the loss turns from quadratic to linear")


class SmoothL1:
    def __init__(self, options: SmoothL1Options):
        self.beta = options.beta

    def __call__(self, student, teacher):
        return F.smooth_l1_loss(student, teacher.detach(), beta=self.beta)


@hookimpl
def register_distill_losses(register):
    register(PluginRecord(name="template-smooth-l1", category="distill-loss", factory=SmoothL1,
                          options_model=SmoothL1Options, description="smooth L1 on activations (template)"))
