"""A block source: one 3x3 convolution in place of any segment that maps feature maps to feature
maps, at the segment's own channel counts and spatial reduction."""

from torch import nn

from bespoke.api import AlternativeSpec, PluginRecord, hookimpl


class OneConv:
    def propose(self, ctx, segment):
        if len(segment.in_shape) != 4 or len(segment.out_shape) != 4:
            return []  # tokens or vectors: this source has nothing to offer
        options = {"c_in": segment.in_shape[1], "c_out": segment.out_shape[1], "stride": segment.reduction}
        return [AlternativeSpec(source="template-one-conv", kind="conv", label="conv3x3", options=options)]

    def create(self, ctx, segment, spec):
        # Random initialisation: block-level distillation trains it against the teacher segment.
        return self.rebuild(ctx, segment, spec), spec

    def rebuild(self, ctx, segment, spec):
        o = spec.options
        return nn.Sequential(nn.Conv2d(o["c_in"], o["c_out"], 3, stride=o["stride"], padding=1, bias=False),
                             nn.BatchNorm2d(o["c_out"]), nn.ReLU())


@hookimpl
def register_block_sources(register):
    register(PluginRecord(name="template-one-conv", category="block-source", factory=lambda options: OneConv(),
                          description="one 3x3 convolution per segment (template)"))
