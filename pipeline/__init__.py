"""Staged LLM and diffusion pretraining pipeline."""

__version__ = "0.1.0"
