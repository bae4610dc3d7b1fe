"""Errors a user can fix. The CLI prints them as one paragraph and exits 2."""


class FactoryError(Exception):
    """A problem with the user's input (recipe, paths, output), not a bug.

    The message names what is wrong and how to fix it.
    """


class RecipeError(FactoryError):
    """A recipe that does not validate; the message names YAML paths and lines."""
