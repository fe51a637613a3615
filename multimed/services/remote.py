"""An encoder's trainable model on a remote Open Inference Protocol server (Triton, or another
MultiMed gateway), through tritonclient's asyncio gRPC client. The pipeline's own decode,
preprocess and frozen features stage run here; only the model-ready tensor travels."""

from __future__ import annotations

import logging

import torch
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from multimed.models.errors import BackendUnavailable
from multimed.models.modalities.base import Batch, EncoderOutput, ModalityPipeline
from multimed.services.config import ClientTLS, EncoderBackend
from multimed.services.tokens import client_token
from multimed.services.triton import encoder_model, encoder_signature

log = logging.getLogger("multimed.remote")


class TritonEncoder:
    def __init__(self, pipeline: ModalityPipeline, settings: EncoderBackend):
        self.pipeline = pipeline
        self.modality = pipeline.modality
        self.url = settings.url
        self.model = settings.model or encoder_model(self.modality)
        self.timeout_s = settings.timeout_s
        token = client_token(settings.token_file) if settings.token_file else None
        self.headers = {"authorization": f"Bearer {token}"} if token else None
        signature = encoder_signature(self.modality, pipeline.model_input(), pipeline.embed_dim)
        self.outputs = signature.output_names
        self.client = triton_aio.InferenceServerClient(self.url, **_tls(settings.tls))

    def _unavailable(self, problem: str) -> BackendUnavailable:
        return BackendUnavailable(
            f"{self.modality} encoder: model {self.model!r} on the Triton server at {self.url} "
            f"{problem}"
        )

    async def check(self) -> None:
        """Startup check: logs (does not fail) when the server or the model is not ready yet,
        so a replica can start before its model server does."""
        try:
            ready = await self.client.is_model_ready(
                self.model, headers=self.headers, client_timeout=self.timeout_s
            )
        except InferenceServerException as e:
            ready = False
            log.warning("%s", self._unavailable(f"is not reachable: {e.message()}"))
        if not ready:
            log.warning("%s", self._unavailable("is not ready (yet)"))

    async def forward(self, batch: Batch) -> EncoderOutput:
        featured = self.pipeline.featurise(batch)  # the frozen stage (MiniLM) runs here
        tensor = self.pipeline.model_tensor(featured).cpu()
        array = tensor.numpy()
        sent = InferInput(self.modality, list(array.shape), np_to_triton_dtype(array.dtype))
        sent.set_data_from_numpy(array)
        try:
            result = await self.client.infer(
                self.model,
                [sent],
                outputs=[InferRequestedOutput(name) for name in self.outputs],
                client_timeout=self.timeout_s,
                headers=self.headers,
            )
        except InferenceServerException as e:
            status = (e.status() or "").removeprefix("StatusCode.")
            raise self._unavailable(f"failed ({status}): {e.message()}") from None
        pooled = torch.from_numpy(result.as_numpy("embedding").copy())
        descriptor = torch.from_numpy(result.as_numpy("descriptor").copy())
        if "tokens" not in self.outputs:
            return EncoderOutput(pooled, descriptor=descriptor)
        tokens = torch.from_numpy(result.as_numpy("tokens").copy())
        mask = self.pipeline.model_batch(tensor)["mask"][:, : tokens.shape[1]]
        return EncoderOutput(pooled, tokens, mask, descriptor)


def _tls(tls: ClientTLS | None) -> dict:
    """tritonclient's channel arguments (it reads PEM files by path)."""
    if tls is None:
        return {}
    return {
        "ssl": True,
        "root_certificates": tls.ca,
        "private_key": tls.key,
        "certificate_chain": tls.cert,
    }
