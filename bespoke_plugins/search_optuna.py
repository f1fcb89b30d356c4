"""Optuna study: constrained single objective or NSGA-II Pareto front."""

from bespoke import NotImplementedYet, PluginRecord, hookimpl


def _factory(options):
    raise NotImplementedYet("optuna is registered but not implemented yet")


@hookimpl
def register_search_strategies(register):
    register(PluginRecord(name="optuna", category="search", factory=_factory,
                          description="Optuna study: constrained single objective or NSGA-II Pareto front"))
