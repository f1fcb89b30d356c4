"""Dependency-aware channel-pruned copies of teacher segments (torch-pruning)."""

from bespoke import NotImplementedYet, PluginRecord, hookimpl


def _factory(options):
    raise NotImplementedYet("pruned-self is registered but not implemented yet")


@hookimpl
def register_block_sources(register):
    register(PluginRecord(name="pruned-self", category="block-source", factory=_factory,
                          description="Dependency-aware channel-pruned copies of teacher segments (torch-pruning)"))
