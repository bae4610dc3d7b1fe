"""Stages, one module per model role. Importing this package registers them by name."""
from . import augmenters, captioners, checkers, generators, renderers  # noqa: F401
