"""Modality pipelines, one module per modality; `registry` lists them explicitly."""
