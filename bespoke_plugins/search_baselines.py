"""Baseline search strategies: greedy and random."""

from bespoke import NotImplementedYet, PluginRecord, hookimpl


def _factory(options):
    raise NotImplementedYet("not implemented yet")


@hookimpl
def register_search_strategies(register):
    register(PluginRecord(name="greedy", category="search", factory=_factory,
                          description="Greedy by loss per millisecond saved"))
    register(PluginRecord(name="random", category="search", factory=_factory,
                          description="Random feasible solutions, best kept (the baseline)"))
