"""Model definitions the factory trains itself (the diffusion stack comes from diffusers)."""
