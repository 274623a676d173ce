"""Planning over annotated graphs: the estimated peak, the budget planner's choice, the memory plan."""
