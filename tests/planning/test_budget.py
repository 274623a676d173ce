"""revpass/planning/budget.py's choice, a pure function from measured savings to a strategy per
site, on hand-made savings: "min" takes what keeps least (the least extra compute on a tie); a
budget in bytes converts with exact nodes first, then upgrades to reversible and then recompute
in order of the bytes each upgrade saves, until the budget is met; a budget below the floor is
refused with the smallest reachable figure. (Through convert, on real models: tests/planning/test_planner.py.)"""

import pytest

from revpass.planning.budget import STRATEGIES, BudgetError, choose

# bytes each strategy saves per site; "c" gains nothing from exact, "a" and "b" most from recompute
SAVINGS = {
    "exact": {"a": 100, "b": 200, "c": 0},
    "reversible": {"a": 300, "b": 250, "c": 50},
    "recompute": {"a": 350, "b": 600},  # "c" missing: saves nothing
}
TOTAL = 2000  # bytes kept before conversion; the floor is 2000 - (350 + 600 + 50) = 1000


def _strategies(choice):
    return {p: s for p, (s, _) in choice.items()}


def test_strategies_are_in_order_of_extra_compute():
    assert STRATEGIES == ("exact", "reversible", "recompute")


def test_min_takes_what_keeps_least_everywhere():
    choice, kept = choose(TOTAL, SAVINGS, "min")
    assert _strategies(choice) == {"a": "recompute", "b": "recompute", "c": "reversible"}
    assert kept == 1000
    assert choice["a"][1] == "'min': recompute keeps the least (350 bytes saved)"
    assert choice["c"][1] == "'min': reversible keeps the least (50 bytes saved)"


def test_min_breaks_ties_by_the_least_extra_compute_and_leaves_what_saves_nothing():
    savings = {"exact": {"d": 100, "e": -20}, "reversible": {"d": 100, "e": 0, "f": 40}, "recompute": {"f": 40}}
    choice, kept = choose(500, savings, "min")
    assert _strategies(choice) == {"d": "exact", "e": None, "f": "reversible"}
    assert choice["e"][1] == "no strategy keeps less than the library neuron"
    assert kept == 500 - 100 - 40


@pytest.mark.parametrize("budget,want,kept", [
    (2000, {"a": None, "b": None, "c": None}, 2000),  # met as it is
    (1900, {"a": "exact", "b": None, "c": None}, 1900),  # exact, in path order, until it is met
    (1700, {"a": "exact", "b": "exact", "c": None}, 1700),
    (1500, {"a": "reversible", "b": "exact", "c": None}, 1500),  # a's upgrade saves most (200)
    (1200, {"a": "reversible", "b": "recompute", "c": "reversible"}, 1050),  # then b's (350)
    (1000, {"a": "recompute", "b": "recompute", "c": "reversible"}, 1000),  # the floor itself
])
def test_a_budget_converts_with_the_least_extra_compute(budget, want, kept):
    choice, predicted = choose(TOTAL, SAVINGS, budget)
    assert _strategies(choice) == want
    assert predicted == kept <= budget
    # the prediction is what the chosen strategies save
    assert predicted == TOTAL - sum(SAVINGS[s].get(p, 0) for p, s in want.items() if s is not None)


def test_reasons_say_what_each_choice_saves_and_costs():
    choice, _ = choose(TOTAL, SAVINGS, 1200)
    assert choice["b"][1] == ("recompute saves 600 bytes, needed for the budget (costs one more forward of the "
                              "segment ending at it)")
    assert choice["a"][1] == ("reversible saves 300 bytes, needed for the budget (costs a reconstruction of the "
                              "neuron in backward)")
    choice, _ = choose(TOTAL, SAVINGS, 1900)
    assert choice["a"][1] == "exact saves 100 bytes at no extra compute"
    assert choice["b"][1] == "the budget is met without converting it"
    # a site whose exact node saves nothing, left because the upgrades of others met the budget:
    # it is not said to save nothing (its reversible node would)
    choice, _ = choose(TOTAL, SAVINGS, 1500)
    assert choice["c"] == (None, "the budget is met without converting it")


def test_a_budget_below_the_floor_names_the_smallest_reachable_figure():
    with pytest.raises(BudgetError, match=r"a budget of 999 bytes cannot be met: the smallest reachable figure is "
                                          r"1000 bytes.*before conversion the model keeps 2000 bytes"):
        choose(TOTAL, SAVINGS, 999)
    assert issubclass(BudgetError, ValueError)


@pytest.mark.parametrize("budget", [-1, 1500.0, "max", None, True])
def test_anything_but_bytes_or_min_is_refused(budget):
    with pytest.raises(ValueError, match="budget must be a number of bytes or 'min'"):
        choose(TOTAL, SAVINGS, budget)


def test_no_sites():
    assert choose(123, {s: {} for s in STRATEGIES}, "min") == ({}, 123)
    assert choose(123, {s: {} for s in STRATEGIES}, 123) == ({}, 123)


def test_same_function_strategies_only_when_the_mode_keeps_the_function():
    from revpass.planning.budget import allowed

    assert allowed("reversible") == STRATEGIES
    assert allowed("exact") == allowed("recompute") == ("exact", "recompute")
    same = allowed("exact")
    choice, kept = choose(TOTAL, SAVINGS, "min", same)
    assert _strategies(choice) == {"a": "recompute", "b": "recompute", "c": None}  # c: only reversible saved
    assert kept == TOTAL - 350 - 600
    choice, kept = choose(TOTAL, SAVINGS, 1500, same)
    assert "reversible" not in _strategies(choice).values() and kept <= 1500
    with pytest.raises(BudgetError, match="smallest reachable figure is 1050 bytes"):
        choose(TOTAL, SAVINGS, 1000, same)
