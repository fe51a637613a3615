"""The one catalog of modalities and tasks. Data, not code: services and training read it; nothing
else keeps its own list. Adding a task is one entry here; adding a modality is one entry here plus
its pipeline module."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources

from multimed.models.errors import (
    MissingModality,
    UnexpectedModality,
    UnknownModality,
    UnknownTask,
)

# Bumped whenever a task's labels, modalities or output kind change: bundles record it, and a
# bundle trained against another catalog version is refused.
CATALOG_VERSION = "1"


class InputForm(StrEnum):
    """Wire forms an input can take. Each modality accepts a subset."""

    TEXT = "text"
    IMAGE = "image"  # PNG / JPEG / TIFF bytes
    DICOM = "dicom"  # one DICOM file (single or multi-frame)
    DICOM_SERIES = "dicom_series"  # several DICOM files of one series
    EDF = "edf"  # EDF / EDF+ bytes
    SEQUENCE = "sequence"  # raw or FASTA sequence text
    GENE_COUNTS = "gene_counts"  # gene -> count map
    TENSOR = "tensor"  # float array in the decoded layout
    # The model-ready tensor (a pipeline's `TensorSpec`): taken by every modality, listed in no
    # modality's forms; it is what Open Inference Protocol clients and remote encoders send.
    PREPROCESSED = "preprocessed"


class OutputKind(StrEnum):
    SINGLE_LABEL = "single_label"
    MULTI_LABEL = "multi_label"
    REGRESSION = "regression"
    PER_TOKEN = "per_token_labels"
    ANSWER = "answer"


@dataclass(frozen=True)
class ModalitySpec:
    id: str
    description: str
    forms: frozenset[InputForm]
    emits_tokens: bool = False  # also returns per-token embeddings (sequences)


@dataclass(frozen=True)
class TaskSpec:
    id: str
    description: str
    output: OutputKind
    labels: tuple[str, ...]
    metric: str
    all_of: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    token_modality: str | None = None  # PER_TOKEN: whose tokens are labelled

    @property
    def accepted(self) -> tuple[str, ...]:
        return self.all_of + self.any_of + self.optional

    def check_modalities(self, present: Iterable[str]) -> None:
        """Raise unless `present` can answer this task: none required missing, none unaccepted."""
        present = set(present)
        unexpected = sorted(present - set(self.accepted))
        if unexpected:
            raise UnexpectedModality(
                f"task {self.id!r} does not accept {', '.join(unexpected)}; "
                f"it accepts {', '.join(self.accepted)}"
            )
        missing = [m for m in self.all_of if m not in present]
        if missing:
            raise MissingModality(f"task {self.id!r} requires {', '.join(missing)}")
        if self.any_of and not present.intersection(self.any_of):
            raise MissingModality(
                f"task {self.id!r} requires at least one of {', '.join(self.any_of)}"
            )


@dataclass(frozen=True)
class Catalog:
    modalities: dict[str, ModalitySpec] = field(default_factory=dict)
    tasks: dict[str, TaskSpec] = field(default_factory=dict)

    def add_modality(self, spec: ModalitySpec) -> None:
        if spec.id in self.modalities:
            raise ValueError(f"duplicate modality {spec.id!r}")
        self.modalities[spec.id] = spec

    def add_task(self, spec: TaskSpec) -> None:
        if spec.id in self.tasks:
            raise ValueError(f"duplicate task {spec.id!r}")
        unknown = [m for m in spec.accepted if m not in self.modalities]
        if unknown:
            raise ValueError(f"task {spec.id!r} names unknown modalities {unknown}")
        self.tasks[spec.id] = spec

    def task(self, task_id: str) -> TaskSpec:
        try:
            return self.tasks[task_id]
        except KeyError:
            raise UnknownTask(task_id, tuple(self.tasks)) from None

    def modality(self, modality_id: str) -> ModalitySpec:
        try:
            return self.modalities[modality_id]
        except KeyError:
            raise UnknownModality(modality_id, tuple(self.modalities)) from None

    def to_json(self) -> dict:
        return {
            "catalog_version": CATALOG_VERSION,
            "modalities": [
                {
                    "id": m.id,
                    "description": m.description,
                    "forms": sorted(m.forms),
                    "emits_tokens": m.emits_tokens,
                }
                for m in self.modalities.values()
            ],
            "tasks": [
                {
                    "id": t.id,
                    "description": t.description,
                    "required": {"all_of": list(t.all_of), "any_of": list(t.any_of)},
                    "optional": list(t.optional),
                    "output": t.output.value,
                    "labels": list(t.labels),
                    "metric": t.metric,
                }
                for t in self.tasks.values()
            ],
        }


F = InputForm
IMAGE_FORMS = frozenset({F.DICOM, F.IMAGE, F.TENSOR})
VOLUME_FORMS = frozenset({F.DICOM, F.DICOM_SERIES, F.TENSOR})
IMAGING = ("xray", "ct", "mri")


def _pbmc_genes() -> tuple[str, ...]:
    text = resources.files("multimed.models.resources").joinpath("pbmc68k_genes.txt").read_text()
    return tuple(line for line in text.splitlines() if line)


# scanpy's pbmc68k_reduced `bulk_labels`: the real cell types the scrna encoder learns.
CELL_TYPES = (
    "CD14+ Monocyte",
    "CD19+ B",
    "CD34+",
    "CD4+/CD25 T Reg",
    "CD4+/CD45RA+/CD25- Naive T",
    "CD4+/CD45RO+ Memory",
    "CD56+ NK",
    "CD8+ Cytotoxic T",
    "CD8+/CD45RA+ Naive Cytotoxic",
    "Dendritic",
)
# Gene panel whose expression `expression_prediction` regresses.
EXPRESSION_PANEL = ("CD3E", "MS4A1", "NKG7", "LYZ", "GNLY", "FCER1A", "CD79A", "CST3")
VQA_ANSWERS = ("yes", "no", "left", "right", "small", "large")


def _build() -> Catalog:
    c = Catalog()
    for spec in (
        ModalitySpec("text", "UTF-8 clinical note, report or question", frozenset({F.TEXT})),
        ModalitySpec("oct", "retinal OCT B-scan", IMAGE_FORMS),
        ModalitySpec("xray", "plain radiograph", IMAGE_FORMS),
        ModalitySpec("ct", "CT volume (DICOM series)", VOLUME_FORMS),
        ModalitySpec("mri", "MRI volume (DICOM series)", VOLUME_FORMS),
        ModalitySpec("pathology", "H&E pathology tile (RGB)", IMAGE_FORMS),
        ModalitySpec("eeg", "EEG recording, channels x time", frozenset({F.EDF, F.TENSOR})),
        ModalitySpec("genomics", "DNA sequence", frozenset({F.SEQUENCE}), emits_tokens=True),
        ModalitySpec(
            "scrna", "single-cell RNA-seq gene counts", frozenset({F.GENE_COUNTS, F.TENSOR})
        ),
        ModalitySpec("protein", "amino-acid sequence", frozenset({F.SEQUENCE}), emits_tokens=True),
    ):
        c.add_modality(spec)

    S, M = OutputKind.SINGLE_LABEL, OutputKind.MULTI_LABEL
    for spec in (
        TaskSpec(
            "disease_classification",
            "disease category from any imaging study",
            S,
            ("normal", "infection", "neoplasm", "vascular"),
            "accuracy",
            any_of=IMAGING,
            optional=("text",),
        ),
        TaskSpec(
            "brain_tumor_classification",
            "brain tumour type from MRI",
            S,
            ("glioma", "meningioma", "pituitary", "no_tumor"),
            "accuracy",
            all_of=("mri",),
            optional=("text",),
        ),
        TaskSpec(
            "breast_cancer_classification",
            "benign vs malignant breast pathology",
            S,
            ("benign", "malignant"),
            "accuracy",
            all_of=("pathology",),
            optional=("text",),
        ),
        TaskSpec(
            "radiographic_findings_classification",
            "findings on a radiograph",
            M,
            ("cardiomegaly", "effusion", "nodule", "consolidation", "fracture"),
            "macro_auroc",
            all_of=("xray",),
            optional=("text",),
        ),
        TaskSpec(
            "bone_age_classification",
            "skeletal age band from a hand radiograph",
            S,
            ("0-4y", "5-9y", "10-14y", "15-19y"),
            "accuracy",
            all_of=("xray",),
        ),
        TaskSpec(
            "diabetic_retinopathy_classification",
            # The benchmark's OCT source (OCT2017) is labelled with these four classes; ICDR
            # grades (none..proliferative) are read from fundus photographs, not OCT.
            "retinal OCT finding (OCT2017 classes: diabetic macular edema among them)",
            S,
            ("normal", "drusen", "dme", "cnv"),
            "accuracy",
            all_of=("oct",),
            optional=("text",),
        ),
        TaskSpec(
            "motor_imagery_classification",
            "imagined movement from EEG",
            S,
            ("left_hand", "right_hand", "feet", "tongue"),
            "accuracy",
            all_of=("eeg",),
        ),
        TaskSpec(
            "cell_type_classification",
            "cell type from a single-cell expression profile",
            S,
            CELL_TYPES,
            "accuracy",
            all_of=("scrna",),
        ),
        TaskSpec(
            "expression_prediction",
            "expression of a gene panel from DNA (and cell context)",
            OutputKind.REGRESSION,
            EXPRESSION_PANEL,
            "r2",
            all_of=("genomics",),
            optional=("scrna",),
        ),
        TaskSpec(
            "protein_structure_prediction",
            "3-state secondary structure per residue",
            OutputKind.PER_TOKEN,
            ("H", "E", "C"),
            "per_token_accuracy",
            all_of=("protein",),
            token_modality="protein",
        ),
        TaskSpec(
            "medical_vqa",
            "answer a question about an image",
            OutputKind.ANSWER,
            VQA_ANSWERS,
            "accuracy",
            all_of=("text",),
            any_of=("xray", "ct", "mri", "pathology"),
        ),
    ):
        c.add_task(spec)
    return c


CATALOG = _build()
PBMC_GENES = _pbmc_genes()
