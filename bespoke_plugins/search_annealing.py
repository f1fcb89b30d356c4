"""Simulated annealing from a greedy start (the Bespoke reference method)."""

from bespoke import NotImplementedYet, PluginRecord, hookimpl


def _factory(options):
    raise NotImplementedYet("annealing is registered but not implemented yet")


@hookimpl
def register_search_strategies(register):
    register(PluginRecord(name="annealing", category="search", factory=_factory,
                          description="Simulated annealing from a greedy start (the Bespoke reference method)"))
