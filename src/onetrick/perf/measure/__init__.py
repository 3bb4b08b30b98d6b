"""This machine, measured: the link between K local workers, block times, memory per worker,
and the corrections for K workers time-sharing a small shared machine."""
