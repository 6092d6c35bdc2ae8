"""dragons: distributed batch image classification on Ray."""

__version__ = "0.1.0"
