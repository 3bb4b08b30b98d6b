"""The release of onetrick (read by the build and by `onetrick --version`)."""
__version__ = "0.1.0"
