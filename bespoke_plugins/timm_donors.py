"""Matching segments of other pretrained timm models, with least-squares 1x1 channel adapters."""

from bespoke import NotImplementedYet, PluginRecord, hookimpl


def _factory(options):
    raise NotImplementedYet("timm-donors is registered but not implemented yet")


@hookimpl
def register_block_sources(register):
    register(PluginRecord(name="timm-donors", category="block-source", factory=_factory,
                          description="Matching segments of other pretrained timm models, with least-squares 1x1 channel adapters"))
