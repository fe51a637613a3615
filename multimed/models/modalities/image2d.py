"""Shared pipeline for 2-D imaging (x-ray, OCT, pathology). Decoded type: np.float32
[C, H, W] in [0, 1], C = the modality's `channels`."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from multimed.models.catalog import InputForm
from multimed.models.codecs.dicom import is_rgb, load_dicom, pixel_values, to_display
from multimed.models.codecs.image import MAX_SIDE, read_image
from multimed.models.config import EncoderSize, Frozen
from multimed.models.inputs import RawInput
from multimed.models.modalities.base import (
    Batch,
    EncoderOutput,
    ModalityPipeline,
    TensorSpec,
    as_float_array,
    channel_stats,
    stages_descriptor,
)

MIN_SIDE = 8
GRID = 4
# ITU-R 601 luma, the weights Pillow's convert("L") uses, so DICOM and PNG agree.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_WIDTHS: dict[str, tuple[int, ...]] = {"tiny": (16, 32, 64, 64), "base": (32, 64, 128, 256)}


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> roughly zero-mean, unit-scale input for the encoders."""
    return (x - 0.5) / 0.25


class ConvEncoder(nn.Module):
    """Four conv3x3 stride-2 blocks (BatchNorm, ReLU), pooled to a 4x4 grid, linear projection.
    The grid keeps where things are (left vs right, which region): global pooling would not.
    Reads batch[key]: [B, in_channels, H, W]."""

    def __init__(self, key: str, in_channels: int, size: EncoderSize, embed_dim: int):
        super().__init__()
        self.key = key
        layers: list[nn.Module] = []
        for out_channels in _WIDTHS[size]:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
        self.body = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(GRID), nn.Flatten())
        self.proj = nn.Linear(in_channels * GRID * GRID, embed_dim)

    def forward(self, batch: Batch) -> EncoderOutput:
        x, stats = batch[self.key], []
        for layer in self.body:
            x = layer(x)
            if (
                isinstance(layer, nn.ReLU) and not self.training
            ):  # a block's end; unused in training
                stats.append(channel_stats(x))
        return EncoderOutput(self.proj(self.pool(x)), descriptor=stages_descriptor(stats))


class Image2DSettings(Frozen):
    image_size: int = Field(64, ge=MIN_SIDE, le=1024)  # square side fed to the encoder


class Image2DPipeline(ModalityPipeline):
    Settings = Image2DSettings
    channels: ClassVar[int]  # 1 (grayscale) or 3 (RGB)
    dicom_modality_code: ClassVar[str]  # the DICOM Modality tag this modality is written with

    def decode(self, raw: RawInput) -> np.ndarray:
        if raw.form == InputForm.IMAGE:
            image = read_image(raw.data, self.modality, self.channels)
        elif raw.form == InputForm.DICOM:
            image = self._from_dicom(raw.data)
        elif raw.form == InputForm.TENSOR:
            image = self._from_tensor(raw.data)
        else:
            raise self.error(f"input form {raw.form!s} is not accepted")
        height, width = image.shape[1:]
        if min(height, width) < MIN_SIDE or max(height, width) > MAX_SIDE:
            raise self.error(f"image is {width}x{height}; sides must be {MIN_SIDE}..{MAX_SIDE}")
        return image

    def _from_dicom(self, data: bytes) -> np.ndarray:
        ds = load_dicom(data, self.modality)
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise self.error(f"multi-frame DICOM ({ds.NumberOfFrames} frames) is not a 2-D image")
        display = to_display(ds, pixel_values(ds, self.modality), self.modality)
        if is_rgb(ds):
            image = display.transpose(2, 0, 1) if self.channels == 3 else (display @ _LUMA)[None]
        else:  # grayscale for an RGB modality is replicated, as Pillow's convert("RGB") does
            image = np.repeat(display[None], self.channels, axis=0)
        return np.ascontiguousarray(image, dtype=np.float32)

    def _from_tensor(self, data: object) -> np.ndarray:
        image = as_float_array(self, data, ndim=(2, 3))
        if image.ndim == 2:
            image = image[None]
        if image.shape[0] != self.channels:
            raise self.error(f"tensor has {image.shape[0]} channels, expected {self.channels}")
        if ((image < 0.0) | (image > 1.0)).any():
            raise self.error("tensor values must lie in [0, 1]")
        return image

    def preprocess(self, decoded: np.ndarray) -> Batch:
        size = self.settings.image_size
        image = torch.from_numpy(decoded)
        if tuple(image.shape[-2:]) != (size, size):  # at size, resampling is the identity
            image = F.interpolate(
                image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )[0]
        return {"image": normalise(image)}

    def model_input(self) -> TensorSpec:
        size = self.settings.image_size
        return TensorSpec("image", "float32", (self.channels, size, size))

    def build_encoder(self) -> nn.Module:
        return ConvEncoder("image", self.channels, self.size, self.embed_dim)
