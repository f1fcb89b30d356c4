"""Exports modules to ONNX and times them with ONNX Runtime."""

from bespoke import NotImplementedYet, PluginRecord, hookimpl


def _factory(options):
    raise NotImplementedYet("onnxruntime-latency is registered but not implemented yet")


@hookimpl
def register_latency_estimators(register):
    register(PluginRecord(name="onnxruntime-latency", category="latency", factory=_factory,
                          description="Exports modules to ONNX and times them with ONNX Runtime"))
