"""A configured PACS over DICOMweb (`dicomweb-client`): QIDO-RS to list a study's series, WADO-RS
to retrieve one, STOW-RS to store instances. Synchronous (requests): the server calls it in a
worker thread. Every failure is a `PacsUnavailable` naming the PACS and what failed, never a
patient attribute or a URL's query."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from multimed.models.catalog import CATALOG, InputForm
from multimed.models.codecs.dicom import MAX_BYTES, MAX_SERIES_FILES, to_bytes
from multimed.models.errors import shown
from multimed.models.inputs import RawInput
from multimed.services.config import PacsSettings
from multimed.services.errors import PacsUnavailable, StudyNotFound
from multimed.services.frontends.hospital.findings import SeriesRef

# QIDO-RS series attributes asked for beyond the defaults (Orthanc lists them at series level).
_SERIES_FIELDS = ("SeriesDescription", "SeriesNumber", "BodyPartExamined")
# STOW-RS Failure Reason (PS3.18 table I.2-1), the codes a PACS most often sends back.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "refused: not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
}


@dataclass(frozen=True)
class Stored:
    """What a PACS answered to one STOW-RS request."""

    stored: tuple[str, ...]  # SOP Instance UIDs it took
    failed: tuple[tuple[str, str], ...]  # (SOP Instance UID, reason) it refused


def _value(item: dict, keyword: str, default=None):
    """One attribute of a DICOM JSON object (PS3.18 F.2), by keyword."""
    tag = f"{pydicom.datadict.tag_for_keyword(keyword):08X}"
    values = item.get(tag, {}).get("Value") or [default]
    return values[0]


def _series_ref(item: dict) -> SeriesRef:
    number = _value(item, "SeriesNumber")
    return SeriesRef(
        uid=str(_value(item, "SeriesInstanceUID", "")),
        modality_code=str(_value(item, "Modality", "")),
        number=None if number is None else int(number),
        description=str(_value(item, "SeriesDescription", "")),
        instances=int(_value(item, "NumberOfSeriesRelatedInstances", 0)),
        body_part=str(_value(item, "BodyPartExamined", "")),
    )


class Pacs:
    def __init__(self, name: str, settings: PacsSettings):
        self.name = name
        self.settings = settings
        session = requests.Session()
        if settings.username is not None:
            password = Path(settings.password_file).read_text().strip()
            session.auth = (settings.username, password)
        if settings.ca is not None:
            session.verify = settings.ca
        self.session = session  # also for Orthanc's own REST API (its changes feed)
        self.client = DICOMwebClient(settings.url, session=session, timeout=settings.timeout_s)
        # Its default retries every failure 5 times with 2-16 s waits (30 s against a closed
        # port, measured): a PACS that is down must be UNAVAILABLE at once; callers retry.
        self.client.set_http_retry_params(retry=False)

    @contextmanager
    def asking(self, doing: str) -> Iterator[None]:
        """Around each request to the PACS: its failures become one PacsUnavailable that names
        the PACS, the HTTP status or exception class, and what we were doing."""
        try:
            yield
        except (requests.RequestException, OSError) as e:
            if isinstance(e, requests.HTTPError) and e.response is not None:
                why = f"answered HTTP {e.response.status_code}"
            else:
                why = f"failed ({type(e).__name__})"
            raise PacsUnavailable(f"PACS {shown(self.name)} {why} while {doing}") from None

    def studies_on(self, date: str) -> dict[str, int]:
        """Study Instance UID -> instances, for the studies of one Study Date (YYYYMMDD)."""
        with self.asking("searching studies"):
            found = self.client.search_for_studies(
                search_filters={"StudyDate": date},
                fields=("NumberOfStudyRelatedInstances",),
                get_remaining=True,
            )
        return {
            str(_value(s, "StudyInstanceUID")): int(_value(s, "NumberOfStudyRelatedInstances", 0))
            for s in found
        }

    def series(self, study_uid: str) -> list[SeriesRef]:
        """The study's series (QIDO-RS), by Series Number. StudyNotFound when it has none."""
        with self.asking("listing a study's series"):
            found = self.client.search_for_series(
                study_uid, fields=_SERIES_FIELDS, get_remaining=True
            )
        if not found:
            raise StudyNotFound(f"PACS {shown(self.name)} has no study {shown(study_uid)}")
        refs = [_series_ref(s) for s in found]
        return sorted(refs, key=lambda r: (r.number is None, r.number or 0, r.uid))

    def retrieve(self, study_uid: str, series: SeriesRef) -> list[Dataset]:
        """A series' instances (WADO-RS), streamed: refused past the limits the DICOM pipeline
        has (MAX_SERIES_FILES files, MAX_BYTES of pixel data) before more is read."""
        if series.instances > MAX_SERIES_FILES:
            raise SeriesTooBig(f"{series.instances} instances, over the {MAX_SERIES_FILES} limit")
        instances, size = [], 0
        with self.asking("retrieving a series"):
            for ds in self.client.iter_series(study_uid, series.uid):
                size += len(ds.get("PixelData") or b"")
                if size > MAX_BYTES or len(instances) >= MAX_SERIES_FILES:
                    raise SeriesTooBig(f"over {MAX_BYTES} bytes or {MAX_SERIES_FILES} files")
                instances.append(ds)
        return instances

    def holds(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """Whether QIDO-RS lists this instance (a store's answer is not always the truth)."""
        with self.asking("checking a stored instance"):
            found = self.client.search_for_instances(
                study_uid, series_uid, search_filters={"SOPInstanceUID": sop_uid}
            )
        return bool(found)

    def store(self, datasets: Sequence[Dataset]) -> Stored:
        """Store instances (STOW-RS). The PACS's refusals come back in `failed`, named by SOP
        Instance UID and reason; a failed request raises PacsUnavailable."""
        with self.asking("storing instances"):
            answer = self.client.store_instances(list(datasets))
        stored = tuple(
            str(item.ReferencedSOPInstanceUID)
            for item in (answer.get("ReferencedSOPSequence") or ())
        )
        failed = tuple(
            (
                str(item.get("ReferencedSOPInstanceUID", "")),
                FAILURE_REASONS.get(int(item.get("FailureReason", 0)), "refused"),
            )
            for item in (answer.get("FailedSOPSequence") or ())
        )
        return Stored(stored, failed)


# A UID is digits and dots, at most 64 characters (PS3.5 9.1); leading zeros, which the standard
# forbids, are let through: real archives hold such UIDs.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_uid(value: str) -> bool:
    """Whether `value` is a DICOM UID: what goes into a PACS URL path must be one, so that no
    caller steers the URL ('../../instances', a query string)."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


def wire_input(modality: str, instances: Sequence[Dataset]) -> RawInput:
    """A retrieved series as the input its modality takes: a volume's every slice, or a 2-D
    image's first instance (by Instance Number)."""
    if InputForm.DICOM_SERIES in CATALOG.modality(modality).forms:
        return RawInput(modality, InputForm.DICOM_SERIES, [to_bytes(ds) for ds in instances])
    first = min(instances, key=lambda ds: int(ds.get("InstanceNumber") or 0))
    return RawInput(modality, InputForm.DICOM, to_bytes(first))


def study_date_today() -> str:
    return date.today().strftime("%Y%m%d")


class SeriesTooBig(Exception):
    """A series the pipelines would refuse anyway: it fails alone, named in the answer."""


def dicom_files(folder: Path) -> Iterator[Path]:
    """Every DICOM file under a folder (by its preamble), in path order."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                head = f.read(132)
            if head[128:132] == b"DICM":
                yield path


def upload(
    pacs: Pacs, files: Sequence[Path], progress: Callable[[int], object], batch: int = 32
) -> tuple[int, list[tuple[Path, str]]]:
    """Store files by STOW-RS, `batch` a request: -> (instances stored, [(file, reason)] the
    PACS refused). A file that is not readable DICOM is refused here, by name."""
    stored, refused = 0, []
    for start in range(0, len(files), batch):
        chunk, datasets = files[start : start + batch], {}
        for path in chunk:
            try:
                ds = pydicom.dcmread(path)
                datasets[str(ds.SOPInstanceUID)] = (path, ds)
            except (InvalidDicomError, AttributeError, OSError) as e:
                refused.append((path, f"not readable DICOM ({type(e).__name__})"))
        if datasets:
            answer = pacs.store([ds for _, ds in datasets.values()])
            stored += len(answer.stored)
            refused += [(datasets[uid][0], why) for uid, why in answer.failed if uid in datasets]
        progress(len(chunk))
    return stored, refused
