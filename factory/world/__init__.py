"""The reference world: real handwritten digits in procedural scenes with exact labels."""
from .palette import PALETTE, allowed_pairs, colours_in
from .pixel_counter import count_objects
from .scenes import SIZE, Glyph, Scene, density_map, make_scene, rng_for

__all__ = [
    "PALETTE", "SIZE", "Glyph", "Scene", "allowed_pairs", "colours_in", "count_objects",
    "density_map", "make_scene", "rng_for",
]
