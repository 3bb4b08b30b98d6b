"""Performance: predicting a training step (``onetrick simulate``, ``onetrick plan``),
measuring this machine, and timing real steps (``onetrick bench``). Four parts, each
importing only those above it in this list:

* :mod:`~onetrick.perf.predict`: the cost model, pure (no processes, no files, no
  printing): a model as blocks, compute costs counted from a GPU profile, the collective
  schedule of every strategy, :func:`~onetrick.perf.predict.step.predict` of one step,
  its predicted memory per worker;
* :mod:`~onetrick.perf.measure`: this machine, measured: the gloo link between K local
  workers (:mod:`~onetrick.perf.measure.links`), every block's time
  (:mod:`~onetrick.perf.measure.block_times`), memory per worker
  (:mod:`~onetrick.perf.measure.memory`), and the corrections for K workers time-sharing
  a small shared machine (:mod:`~onetrick.perf.measure.shared_host`);
* :mod:`~onetrick.perf.planner`: every way to run one step at K workers, predicted, the
  fastest that fits chosen and explained (``plan``, ``train --strategy auto``);
* :mod:`~onetrick.perf.bench`: ``onetrick bench``: its jobs, the runner (local or in
  network namespaces), the worker processes, the reports, and the checks of the cost
  model and the planner against what it measured.

The commands themselves are in :mod:`onetrick.cli`. Nothing is imported here, so
``import onetrick.perf.predict.step`` pulls in only what it needs.
"""
