"""Low-rank factorised copies of a segment's 1x1 convolutions and linear layers."""

from bespoke import NotImplementedYet, PluginRecord, hookimpl


def _factory(options):
    raise NotImplementedYet("lowrank is registered but not implemented yet")


@hookimpl
def register_block_sources(register):
    register(PluginRecord(name="lowrank", category="block-source", factory=_factory,
                          description="Low-rank factorised copies of a segment's 1x1 convolutions and linear layers"))
