"""One training run, top-down: :func:`onetrick.run.train.train` validates the options once,
describes the model once on the meta device (``description``), checks the run against it
(``preflight``), plans ``auto`` (``auto``), settles the run directory (``rundir``) and
launches the workers, which run the synchronous loop (``train``) or an asynchronous one
(``hogwild``, ``paramserver`` over ``async_loop``), writing records, checkpoints and test
error. Reading a run back (``export``, ``plots``) and the paper's table (``study``) live
here too. Nothing here parses arguments or prints results: that is ``onetrick.cli``."""
