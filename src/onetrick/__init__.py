"""onetrick: train convolutional networks in parallel, the way Krizhevsky's
"One weird trick for parallelizing convolutional neural networks" does."""

__version__ = "0.1.0"
