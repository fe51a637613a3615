"""Plain radiograph pipeline (grayscale): see Image2DPipeline."""

from __future__ import annotations

from multimed.models.modalities.image2d import Image2DPipeline


class XrayPipeline(Image2DPipeline):
    modality = "xray"
    channels = 1
    dicom_modality_code = "DX"
