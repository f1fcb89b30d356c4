"""The identity, for segments whose input and output shapes match."""

from bespoke import NotImplementedYet, PluginRecord, hookimpl


def _factory(options):
    raise NotImplementedYet("skip is registered but not implemented yet")


@hookimpl
def register_block_sources(register):
    register(PluginRecord(name="skip", category="block-source", factory=_factory,
                          description="The identity, for segments whose input and output shapes match"))
