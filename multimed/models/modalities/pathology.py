"""H&E pathology tile pipeline (RGB): see Image2DPipeline."""

from __future__ import annotations

from multimed.models.modalities.image2d import Image2DPipeline


class PathologyPipeline(Image2DPipeline):
    modality = "pathology"
    channels = 3
    dicom_modality_code = "SM"
