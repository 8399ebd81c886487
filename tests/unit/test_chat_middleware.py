"""EnergyBudgetMiddleware without an engine: budgets are validated, the state schema carries the summary."""

from __future__ import annotations

import math

import pytest

from langchain_energy import ChatServing, EnergyBudgetMiddleware
from langchain_energy.errors import ConfigError
from langchain_energy.middleware import EnergyBudgetState


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "10", True])
def test_a_budget_must_be_a_positive_number(bad):
    with pytest.raises(ConfigError, match="positive number"):
        EnergyBudgetMiddleware(budget_j=bad)
    with pytest.raises(ConfigError, match="positive number"):
        EnergyBudgetMiddleware(budget_j_per_token=bad)


def test_some_budget_is_needed_and_the_fallback_is_a_chat_model():
    with pytest.raises(ConfigError, match="budget_j or budget_j_per_token"):
        EnergyBudgetMiddleware()
    with pytest.raises(ConfigError, match="chat model"):
        EnergyBudgetMiddleware(budget_j=1.0, fallback_model="smaller-model")
    assert EnergyBudgetMiddleware(budget_j=1.0, fallback_model=ChatServing()).fallback_model is not None


def test_the_budget_trips_on_joules_or_on_joules_per_token():
    by_joules = EnergyBudgetMiddleware(budget_j=10.0)
    summary = by_joules._fresh()
    assert by_joules._spent(summary) is None
    assert "10 J budget" in by_joules._spent({**summary, "energy_j": 10.0})
    by_rate = EnergyBudgetMiddleware(budget_j_per_token=0.5, min_tokens_for_rate=4)
    assert by_rate._spent({**summary, "energy_j": 3.0, "output_tokens": 2, "j_per_token": 1.5}) is None
    assert "J/token" in by_rate._spent({**summary, "energy_j": 3.0, "output_tokens": 4, "j_per_token": 0.75})


def test_the_energy_summary_is_part_of_the_agent_state():
    assert "energy" in EnergyBudgetState.__annotations__
    assert EnergyBudgetMiddleware.state_schema is EnergyBudgetState
