"""The Open Inference Protocol (KServe v2, what Triton speaks): `inference.GRPCInferenceService`
from the service definitions that ship in tritonclient."""
