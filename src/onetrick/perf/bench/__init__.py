"""``onetrick bench``: its jobs, the runner, the worker processes, the reports, and the checks
of the cost model and the planner against what it measured."""
