"""The identity, for segments whose input and output shapes match (e.g. a residual block).

The cheapest alternative there is: it costs nothing, so the search weighs only what skipping the
segment loses. Uses only bespoke's public API, like a third-party plugin.
"""

from __future__ import annotations

from torch import nn

from bespoke.api import AlternativeSpec, PluginRecord, SegmentInfo, hookimpl


class SkipSource:
    """Block source proposing ``nn.Identity`` where the segment maps a shape to itself."""

    def propose(self, ctx, segment: SegmentInfo) -> list[AlternativeSpec]:
        # Batch is free; every other dimension must match for the identity to plug in.
        if tuple(segment.in_shape[1:]) != tuple(segment.out_shape[1:]):
            return []
        return [AlternativeSpec(source="skip", kind="skip", label="skip", options={})]

    def create(self, ctx, segment: SegmentInfo, spec: AlternativeSpec) -> tuple[nn.Module, AlternativeSpec]:
        return nn.Identity(), spec

    def rebuild(self, ctx, segment: SegmentInfo, spec: AlternativeSpec) -> nn.Module:
        return nn.Identity()


def _factory(options) -> SkipSource:
    return SkipSource()


@hookimpl
def register_block_sources(register):
    register(PluginRecord(name="skip", category="block-source", factory=_factory,
                          description="The identity, for segments whose input and output shapes match"))
