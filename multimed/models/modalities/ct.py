"""CT pipeline: Hounsfield units mapped to [0, 1] through a fixed window."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from multimed.models.codecs.dicom import apply_window
from multimed.models.modalities.volume import VolumePipeline, VolumeSettings


class CTSettings(VolumeSettings):
    window_center: float = 40.0  # HU; the default 40/400 is the soft-tissue window
    window_width: float = Field(400.0, gt=0.0)


class CTPipeline(VolumePipeline):
    modality = "ct"
    dicom_modality_code = "CT"
    Settings = CTSettings

    def intensity(self, volume: np.ndarray) -> np.ndarray:
        s = self.settings
        return apply_window(volume, s.window_center, s.window_width, "LINEAR_EXACT")
