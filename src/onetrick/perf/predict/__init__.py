"""The cost model of a training step, pure: blocks, compute costs, the collective schedule,
the predicted step and memory per worker; no processes, no files, no printing."""
