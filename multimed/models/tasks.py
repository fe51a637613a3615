"""Per-task fusion + head: the small part of the model that the router holds."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from multimed.models.catalog import CATALOG, TaskSpec
from multimed.models.config import ModelConfig
from multimed.models.fusion import build_fusion
from multimed.models.heads import Head
from multimed.models.modalities.base import EncoderOutput
from multimed.models.outputs import Prediction, output_of
from multimed.models.trust import Novelty, OodScore, novelty_input


class TaskModel(nn.Module):
    def __init__(self, spec: TaskSpec, config: ModelConfig):
        super().__init__()
        self.spec = spec
        self.fusion = build_fusion(config.fusion, spec.accepted, config.embed_dim)
        self.head = Head(spec, config.embed_dim)
        # Fitted after training on the validation split (trust.fit_temperature); forward stays
        # uncalibrated, as training needs it, and predict divides by it.
        self.register_buffer("temperature", torch.ones(()))

    def forward(
        self,
        embeddings: Mapping[str, Tensor],
        present: Mapping[str, Tensor],
        tokens: Tensor | None = None,
    ) -> Tensor:
        return self.head(self.fusion(embeddings, present), tokens)


class TaskModels(nn.Module):
    """Every catalog task's fusion and head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tasks = nn.ModuleDict({t: TaskModel(s, config) for t, s in CATALOG.tasks.items()})
        self.novelty = nn.ModuleDict({m: Novelty() for m in CATALOG.modalities})

    @torch.inference_mode()
    def predict(self, task_id: str, outputs: Mapping[str, EncoderOutput]) -> list[Prediction]:
        """Encoder outputs of the modalities present (batch B each) -> B predictions.

        The caller has checked the modalities against the task (`TaskSpec.check_modalities`)."""
        spec = CATALOG.task(task_id)
        embeddings = {m: o.pooled for m, o in outputs.items()}
        batch = next(iter(embeddings.values())).shape[0]
        present = {m: torch.ones(batch, dtype=torch.bool) for m in embeddings}
        tokens = mask = None
        if spec.token_modality:  # the modality whose tokens a per-token head labels
            tokens = outputs[spec.token_modality].tokens
            mask = outputs[spec.token_modality].token_mask
        model = self.tasks[task_id]
        raw = model(embeddings, present, tokens) / model.temperature
        return output_of(spec).predictions(spec.labels, raw, mask)

    @torch.inference_mode()
    def out_of_distribution(self, modality: str, out: EncoderOutput) -> list[OodScore]:
        """One modality's encoder outputs (batch B) -> per item its OOD score and flag."""
        return self.novelty[modality].flags(novelty_input(out.pooled, out.descriptor))
