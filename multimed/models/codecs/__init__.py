"""Wire-format readers and writers (DICOM, EDF, images, sequences), below the pipelines: they
import nothing from `multimed.models.modalities`."""
