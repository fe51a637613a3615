"""Shared pipeline for volumetric imaging (CT, MRI). Decoded type: np.float32 [D, H, W] in
modality units (CT: Hounsfield units; MRI: arbitrary scanner intensity)."""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from multimed.models.catalog import InputForm
from multimed.models.codecs.dicom import MAX_VOXELS, read_dicom_series
from multimed.models.codecs.image import MAX_SIDE
from multimed.models.config import Frozen
from multimed.models.inputs import RawInput
from multimed.models.modalities.base import (
    Batch,
    ModalityPipeline,
    TensorSpec,
    as_float_array,
)
from multimed.models.modalities.image2d import MIN_SIDE, ConvEncoder, normalise


class VolumeSettings(Frozen):
    depth: int = Field(16, ge=1, le=256)  # slices fed to the encoder
    image_size: int = Field(64, ge=MIN_SIDE, le=512)  # square in-plane side


class VolumePipeline(ModalityPipeline):
    """Subclasses map modality units to [0, 1] in `intensity`; everything else is shared."""

    Settings = VolumeSettings
    dicom_modality_code: ClassVar[str]  # the DICOM Modality tag this modality is written with

    def decode(self, raw: RawInput) -> np.ndarray:
        if raw.form == InputForm.DICOM_SERIES:
            volume = read_dicom_series(raw.data, self.modality)
        elif raw.form == InputForm.DICOM:
            volume = read_dicom_series([raw.data], self.modality)
        elif raw.form == InputForm.TENSOR:
            volume = as_float_array(self, raw.data, ndim=(2, 3))
            volume = volume[None] if volume.ndim == 2 else volume
            if volume.size > MAX_VOXELS:
                raise self.error(f"volume has {volume.size} voxels, over {MAX_VOXELS}")
        else:
            raise self.error(f"input form {raw.form!s} is not accepted")
        depth, height, width = volume.shape
        if depth < 1 or min(height, width) < MIN_SIDE or max(height, width) > MAX_SIDE:
            raise self.error(
                f"volume shape {volume.shape}: needs >= 1 slice and sides {MIN_SIDE}..{MAX_SIDE}"
            )
        return volume

    @abstractmethod
    def intensity(self, volume: np.ndarray) -> np.ndarray:
        """Modality units -> float32 in [0, 1]; finite even for a constant volume."""

    def preprocess(self, decoded: np.ndarray) -> Batch:
        s = self.settings
        volume = torch.from_numpy(np.ascontiguousarray(self.intensity(decoded), np.float32))
        size = (s.depth, s.image_size, s.image_size)
        if tuple(volume.shape) != size:  # at size, resampling is the identity: skip its cost
            volume = F.interpolate(
                volume[None, None], size=size, mode="trilinear", align_corners=False
            )[0, 0]
        return {"volume": normalise(volume)}

    def model_input(self) -> TensorSpec:
        s = self.settings
        return TensorSpec("volume", "float32", (s.depth, s.image_size, s.image_size))

    def build_encoder(self) -> nn.Module:
        # 2.5-D: slices are the input channels of a 2-D CNN, cheap enough for CPU training.
        return ConvEncoder("volume", self.settings.depth, self.size, self.embed_dim)
