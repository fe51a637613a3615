"""The whole trainable model in one module tree: one encoder per modality plus the task models.
Serving splits it again: each encoder on its own deployment, the task models on the router."""

from __future__ import annotations

from torch import Tensor, nn

from multimed.models.bundle import Bundle
from multimed.models.cohort.dataset import CohortTensors, TaskData, select
from multimed.models.config import ModelConfig
from multimed.models.modalities.base import ModalityPipeline
from multimed.models.modalities.registry import build_pipelines
from multimed.models.tasks import TaskModels


class Model(nn.Module):
    """Everything trained together: one encoder per modality plus the task models."""

    def __init__(self, pipelines: dict[str, ModalityPipeline], config: ModelConfig):
        super().__init__()
        self.pipelines = pipelines
        self.encoders = nn.ModuleDict({m: p.build_encoder() for m, p in pipelines.items()})
        self.task_models = TaskModels(config)

    def task_outputs(self, data: CohortTensors, task: TaskData, idx: Tensor, present: Tensor):
        """Raw head outputs for `idx`, with `present` [B, M] masking the task's modalities."""
        embeddings, masks, tokens = {}, {}, None
        for j, m in enumerate(task.spec.accepted):
            if m not in task.sources:
                continue
            out = self.encoders[m](select(data.inputs[task.sources[m]], idx))
            embeddings[m], masks[m] = out.pooled, present[:, j]
            if m == task.spec.token_modality:
                tokens = out.tokens
        return self.task_models.tasks[task.spec.id](embeddings, masks, tokens)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Model:
        model = cls(build_pipelines(bundle.config), bundle.config)
        for m, encoder in model.encoders.items():
            encoder.load_state_dict(bundle.encoder_state(m))
        model.task_models.load_state_dict(bundle.tasks_state())
        return model.eval()
