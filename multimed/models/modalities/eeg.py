"""EEG (EDF or channels x time tensor) -> embedding with a compact EEGNet (Lawhern et al. 2018)."""

from __future__ import annotations

import re

import numpy as np
import torch
from pydantic import Field
from torch import nn

from multimed.models.catalog import InputForm
from multimed.models.codecs.edf import MAX_RESAMPLE_FACTOR, read_edf, resample
from multimed.models.codecs.types import EEGRecord
from multimed.models.config import Frozen
from multimed.models.inputs import RawInput
from multimed.models.modalities.base import (
    Batch,
    EncoderOutput,
    ModalityPipeline,
    TensorSpec,
    as_float_array,
    channel_stats,
    check_finite,
    stages_descriptor,
    width,
)

# The 22 EEG channels of BCI Competition IV 2a (10-20 names), in the encoder's order.
BCI_IV_2A_CHANNELS = (
    "Fz", "FC3", "FC1", "FCz", "FC2", "FC4", "C5", "C3", "C1", "Cz", "C2",
    "C4", "C6", "CP3", "CP1", "CPz", "CP2", "CP4", "P1", "Pz", "P2", "POz",
)  # fmt: skip


def channel_key(label: str) -> str:
    """'EEG Cz-REF', 'EEG-Cz' and 'cz' all name channel CZ."""
    return re.sub(r"^EEG[ -]?|-REF$", "", label.strip().upper()).strip()


class EEGSettings(Frozen):
    channels: tuple[str, ...] = Field(BCI_IV_2A_CHANNELS, min_length=1)
    sample_rate_hz: float = Field(128.0, gt=0)
    window_s: float = Field(4.0, gt=0)
    max_duration_s: float = Field(600, gt=0)


class EEGNet(nn.Module):
    def __init__(self, channels: int, f1: int, f2: int, embed_dim: int):
        super().__init__()
        f_spatial = 2 * f1
        self.net = nn.Sequential(
            # Explicit asymmetric "same" padding: torch's padding="same" warns on even kernels.
            nn.ZeroPad2d((15, 16, 0, 0)),
            nn.Conv2d(1, f1, (1, 32), bias=False),  # temporal filters
            nn.BatchNorm2d(f1),
            nn.Conv2d(f1, f_spatial, (channels, 1), groups=f1, bias=False),  # spatial filters
            nn.BatchNorm2d(f_spatial),
            nn.ELU(),
            nn.AvgPool2d((1, 4)),
            nn.ZeroPad2d((7, 8, 0, 0)),
            nn.Conv2d(f_spatial, f_spatial, (1, 16), groups=f_spatial, bias=False),
            nn.Conv2d(f_spatial, f2, 1, bias=False),
            nn.BatchNorm2d(f2),
            nn.ELU(),
            nn.AvgPool2d((1, 8)),
        )
        self.proj = nn.Linear(f2, embed_dim)

    def forward(self, batch: Batch) -> EncoderOutput:
        h, stats = batch["signal"].unsqueeze(1), []
        for layer in self.net:
            h = layer(h)  # ends [B, F2, 1, T / 32]
            if isinstance(layer, nn.ELU) and not self.training:  # a block's end; unused in training
                stats.append(channel_stats(h))
        return EncoderOutput(self.proj(h.mean(dim=(2, 3))), descriptor=stages_descriptor(stats))


class EEGPipeline(ModalityPipeline):
    """Decoded type: `EEGRecord` (microvolts, channels x samples)."""

    modality = "eeg"
    Settings = EEGSettings

    def decode(self, raw: RawInput) -> EEGRecord:
        s = self.settings
        if raw.form == InputForm.EDF:
            record = read_edf(raw.data, self.modality, s.max_duration_s)
        else:  # TENSOR: already in the encoder's channel order and sample rate
            data = as_float_array(self, raw.data, ndim=(2,))
            if data.shape[0] != len(s.channels):
                raise self.error(
                    f"tensor must be [{len(s.channels)} channels, samples], "
                    f"got shape {tuple(data.shape)}"
                )
            record = EEGRecord(data, s.channels, s.sample_rate_hz)
        if record.data.shape[1] == 0:
            raise self.error("recording has no samples")
        duration_s = record.data.shape[1] / record.sample_rate_hz
        if duration_s > s.max_duration_s:
            raise self.error(f"recording lasts {duration_s:.1f} s > maximum {s.max_duration_s} s")
        fold = record.sample_rate_hz / s.sample_rate_hz
        if not 1 / MAX_RESAMPLE_FACTOR <= fold <= MAX_RESAMPLE_FACTOR:  # see `resample`
            raise self.error(
                f"sample rate {record.sample_rate_hz:g} Hz is over {MAX_RESAMPLE_FACTOR}-fold "
                f"from the encoder's {s.sample_rate_hz:g} Hz"
            )
        return record

    def preprocess(self, decoded: EEGRecord) -> Batch:
        s = self.settings
        rows = {}
        for i, label in enumerate(decoded.channels):
            rows.setdefault(channel_key(label), i)  # first of any duplicate label wins
        missing = [c for c in s.channels if channel_key(c) not in rows]
        if missing:
            raise self.error(f"missing channels: {', '.join(missing)}")
        data = decoded.data[[rows[channel_key(c)] for c in s.channels]].astype(np.float32)
        check_finite(self, data, "signal")
        data = resample(data, decoded.sample_rate_hz, s.sample_rate_hz)
        window = round(s.window_s * s.sample_rate_hz)
        start = max(0, (data.shape[1] - window) // 2)  # centre crop
        data = data[:, start : start + window]
        # One scale for the whole recording: per-channel scaling would erase the relative
        # channel power that motor imagery shows (mu desynchronisation over C3 / C4 / Cz).
        # Statistics in float64: float32 sums of large but finite values overflow to Inf.
        data = data.astype(np.float64)
        data = data - data.mean(axis=1, keepdims=True)
        std = float(data.std())
        data = data / (std if std > 1e-6 else 1.0)
        pad = window - data.shape[1]  # centre zero-pad (zero = the channel mean)
        data = np.pad(data, ((0, 0), (pad // 2, pad - pad // 2)))
        return {"signal": torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))}

    def model_input(self) -> TensorSpec:
        s = self.settings
        return TensorSpec(
            "signal", "float32", (len(s.channels), round(s.window_s * s.sample_rate_hz))
        )

    def build_encoder(self) -> nn.Module:
        f1, f2 = width(self.size, 8, 16), width(self.size, 16, 32)
        return EEGNet(len(self.settings.channels), f1, f2, self.embed_dim)
