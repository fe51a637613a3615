"""The synthetic cohort, its files on disk and its training tensors, above the pipelines."""
