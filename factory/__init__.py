"""A Ray-distributed synthetic-dataset factory: recipes in, labelled WebDataset shards out."""

__version__ = "0.1.0"
