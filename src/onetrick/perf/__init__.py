"""Performance: measuring steps (``onetrick bench``) and predicting them (``onetrick simulate``).

The cost model, reusable without either command:

* :mod:`~onetrick.perf.predict.blocks`: a model as a list of blocks (shapes, multiply-adds, FC widths);
* :mod:`~onetrick.perf.predict.compute`: compute per block: counted (:class:`FlopCosts`, named GPU
  :data:`PROFILES`), timed here (:class:`MeasuredCosts`), or none (:class:`ZeroCosts`);
* :mod:`~onetrick.perf.predict.step`: :func:`predict` (blocks, costs, :class:`Variant`, K,
  batch, :class:`Link`) -> :class:`StepResult`; :func:`step_bytes`, :func:`sweep`;
* :mod:`~onetrick.perf.predict.schedule`: inside ``predict``: the link model and the collective
  schedule of every strategy, walked in program order;
* :mod:`~onetrick.perf.bench.model_check`: predictions against a bench result.

Measuring: :mod:`~onetrick.perf.bench.runner` (jobs, local or in network namespaces),
:mod:`~onetrick.perf.bench.processes` (inside the worker processes; machine probes),
:mod:`~onetrick.perf.bench.netns` (the shaped links). Writing: :mod:`~onetrick.perf.bench.report`
(Markdown, JSON, PNG). The commands: :mod:`~onetrick.cli.bench`, :mod:`~onetrick.cli.simulate`.

Nothing is imported here, so ``import onetrick.perf.predict.step`` pulls in only what it needs.
"""
