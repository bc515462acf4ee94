"""The package's version: a leaf module, so code that records it (runinfo) never imports the package root."""

__version__ = "0.1.0"
