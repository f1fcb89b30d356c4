"""Answers from a published latency lookup table; measures nothing."""

from bespoke import NotImplementedYet, PluginRecord, hookimpl


def _factory(options):
    raise NotImplementedYet("lut-latency is registered but not implemented yet")


@hookimpl
def register_latency_estimators(register):
    register(PluginRecord(name="lut-latency", category="latency", factory=_factory,
                          description="Answers from a published latency lookup table; measures nothing"))
