"""Services around the models layer: the command-line interface (serving lands here too)."""
