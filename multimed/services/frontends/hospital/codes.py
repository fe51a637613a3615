"""The codes and names our results are written with, shared by the SR and the FHIR writer.

Tasks and labels are coded in our own coding scheme (the catalog's ids are the code values: DICOM
takes a long one as Long Code Value), as no standard terminology names these synthetic tasks.
"""

from __future__ import annotations

from pydicom.uid import generate_uid

ALGORITHM_NAME = "MultiMed Serve"
MANUFACTURER = "MultiMed Serve"
# DICOM: a private coding scheme designator starts with "99" (PS3.16 section 8).
DICOM_SCHEME = "99MMED"
DICOM_SCHEME_NAME = "MultiMed Serve tasks and labels"
# FHIR: our code systems, one for tasks and one per task's labels (system + "/" + task id).
FHIR_TASK_SYSTEM = "http://multimed-serve.org/fhir/CodeSystem/task"
FHIR_LABEL_SYSTEM = "http://multimed-serve.org/fhir/CodeSystem/label"
# Per used modality, how far its input lies from the training data (models/trust.py): code
# "out-of-distribution-score/<modality>".
FHIR_TRUST_SYSTEM = "http://multimed-serve.org/fhir/CodeSystem/trust"


def device_uid(bundle_version: str) -> str:
    """The algorithm's Device UID: derived from the bundle version, so the same model always has
    the same UID and a new model a new one."""
    return generate_uid(entropy_srcs=[ALGORITHM_NAME, bundle_version])
