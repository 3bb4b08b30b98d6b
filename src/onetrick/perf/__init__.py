"""Performance: measuring steps (``onetrick bench``) and predicting them (``onetrick simulate``).

The cost model, reusable without either command:

* :mod:`~onetrick.perf.blocks`: a model as a list of blocks (shapes, multiply-adds, FC widths);
* :mod:`~onetrick.perf.costs`: compute per block: counted (:class:`FlopCosts`, named GPU
  :data:`PROFILES`), timed here (:class:`MeasuredCosts`), or none (:class:`ZeroCosts`);
* :mod:`~onetrick.perf.costmodel`: :func:`predict` (blocks, costs, :class:`Variant`, K,
  batch, :class:`Link`) -> :class:`StepResult`; :func:`step_bytes`, :func:`sweep`;
* :mod:`~onetrick.perf.schedule`: inside ``predict``: the link model and the collective
  schedule of every strategy, walked in program order;
* :mod:`~onetrick.perf.validate`: predictions against a bench result.

Measuring: :mod:`~onetrick.perf.runner` (jobs, local or in network namespaces),
:mod:`~onetrick.perf.workers` (inside the worker processes; machine probes),
:mod:`~onetrick.perf.netlink` (the shaped links). Writing: :mod:`~onetrick.perf.report`
(Markdown, JSON, PNG). The commands: :mod:`~onetrick.perf.bench`, :mod:`~onetrick.perf.simulate`.

Nothing is imported here, so ``import onetrick.perf.costmodel`` pulls in only what it needs.
"""
