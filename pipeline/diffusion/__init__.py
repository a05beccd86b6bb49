"""Diffusion: objectives (DDPM epsilon/v, flow matching), the image training loop's config and
EMA export, and the class-conditional pipeline class every diffusion export ships."""
