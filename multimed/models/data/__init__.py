"""Packaged data files and wire-format readers and writers (EDF, FASTA)."""
