"""Latent-space editing: generators with a latent space, inverters, attribute labels, editors.

    generator.py   the Generator interface, the shipped regularised autoencoder, StyleGAN adapters
    attributes.py  the world's binary attributes and the two attribute classifiers
    inversion.py   encoder, optimisation and DDIM inversion
    editors/       one module per editor family (centroid, wasserstein, classifier, clone, continuous, slot) behind EDITORS
"""
