"""Times modules in PyTorch on this device (median of interleaved runs)."""

from bespoke import NotImplementedYet, PluginRecord, hookimpl


def _factory(options):
    raise NotImplementedYet("measured-latency is registered but not implemented yet")


@hookimpl
def register_latency_estimators(register):
    register(PluginRecord(name="measured-latency", category="latency", factory=_factory,
                          description="Times modules in PyTorch on this device (median of interleaved runs)"))
