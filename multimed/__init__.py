"""MultiMed Serve: multimodal, multitask medical AI served over gRPC."""

__version__ = "0.1.0"
