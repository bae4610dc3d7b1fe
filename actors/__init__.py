"""Stages, one module per model role. Importing this package registers them by name."""
from . import augmenters, captioners, checkers, editors, generators, inverters, renderers  # noqa: F401
