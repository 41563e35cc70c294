"""pyflannel: a drop-in replacement for flanneld."""

__version__ = "0.1.0"
