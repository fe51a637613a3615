"""Which modality each series of a study is: the configured rules first, then the DICOM
Modality. A series routed nowhere is ignored, with the reason."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from multimed.services.config import SeriesRule
from multimed.services.frontends.hospital.findings import SeriesRef

# DICOM Modality (PS3.3 C.7.3.1.1.1) -> catalog modality: what our imaging encoders read.
DEFAULT_ROUTES = {
    "DX": "xray",
    "CR": "xray",
    "CT": "ct",
    "MR": "mri",
    "OPT": "oct",
    "SM": "pathology",
}
IGNORE = "ignore"


@dataclass(frozen=True)
class Route:
    """What becomes of one series: the modality it is read as, or why it is not used."""

    series: SeriesRef
    modality: str  # a catalog modality, or "" when not used
    reason: str = ""  # why not

    def ignored(self, reason: str) -> Route:
        return Route(self.series, "", reason)


def _matches(rule: SeriesRule, series: SeriesRef) -> bool:
    return (
        (rule.dicom_modality is None or series.modality_code in rule.dicom_modality)
        and (rule.body_part is None or series.body_part.upper() in map(str.upper, rule.body_part))
        and (
            rule.description is None
            or re.search(rule.description, series.description, re.IGNORECASE) is not None
        )
    )


def route(series: SeriesRef, rules: Sequence[SeriesRule] = ()) -> Route:
    modality = next((r.modality for r in rules if _matches(r, series)), None)
    if modality == IGNORE:
        return Route(series, "", "left out by a series rule")
    if modality is None:
        modality = DEFAULT_ROUTES.get(series.modality_code)
    if modality is None:
        code = series.modality_code or "none"
        return Route(series, "", f"DICOM modality {code} is not an input of any task")
    return Route(series, modality)
