"""Model builders: every model is built from a config, never from downloaded weights."""
