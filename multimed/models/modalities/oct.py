"""Retinal OCT B-scan pipeline (grayscale): see Image2DPipeline."""

from __future__ import annotations

from multimed.models.modalities.image2d import Image2DPipeline


class OCTPipeline(Image2DPipeline):
    modality = "oct"
    channels = 1
    dicom_modality_code = "OPT"
