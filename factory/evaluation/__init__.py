"""Measurements: label fidelity of generated samples, downstream utility."""
