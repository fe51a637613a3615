"""The product's own API, `multimed.v1.MultiMed` (protos/multimed/v1)."""
