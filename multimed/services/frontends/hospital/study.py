"""PredictStudy, protocol-free: a study's series listed and retrieved from a configured PACS,
each routed to a modality and read by its encoder (an unreadable series fails alone, named in
the answer, and the next series of its modality is tried), then every task the study can answer
is answered through the data plane, coalesced with the rest of the traffic. The answers go back
as findings, a FHIR bundle (POSTed when an endpoint is configured) and, when asked, a DICOM SR
stored into the same study."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from multimed.models.catalog import CATALOG, OutputKind
from multimed.models.errors import MissingModality, shown
from multimed.models.inputs import RawInput
from multimed.models.outputs import output_of
from multimed.services.config import HospitalSettings
from multimed.services.dataplane import DataPlane
from multimed.services.errors import ProtocolError, Status, to_status
from multimed.services.frontends.hospital.fhir import FhirOutcome, build_bundle, post_bundle
from multimed.services.frontends.hospital.findings import SeriesRef, StudyFindings, TaskFinding
from multimed.services.frontends.hospital.pacs import Pacs, SeriesTooBig, is_uid, wire_input
from multimed.services.frontends.hospital.routing import Route, route
from multimed.services.frontends.hospital.sr import build_sr
from multimed.services.tokens import client_token
from multimed.services.types import PredictCall, PredictResult

log = logging.getLogger("multimed.hospital")


@dataclass(frozen=True)
class StudyRequest:
    request_id: str
    pacs: str
    study_uid: str
    tasks: tuple[str, ...]  # empty: every task the study can answer
    inputs: tuple[RawInput, ...]  # non-DICOM inputs sent along
    store_sr: bool
    deadline: float


@dataclass(frozen=True)
class Skipped:
    task: str
    status: Status
    message: str


@dataclass(frozen=True)
class SrOutcome:
    stored: bool
    series_uid: str = ""
    sop_uid: str = ""
    message: str = ""


@dataclass(frozen=True)
class StudyResult:
    request_id: str
    study_uid: str
    bundle_version: str
    answers: tuple[tuple[PredictResult, tuple[str, ...]], ...]  # (result, series UIDs used)
    skipped: tuple[Skipped, ...]
    series: tuple[Route, ...]  # every series, and what became of it
    fhir_bundle: dict
    fhir: FhirOutcome | None  # None: no FHIR endpoint configured
    sr: SrOutcome | None  # None: not asked


@dataclass(frozen=True)
class _Read:
    """The series read for one modality: its wire input and the instances behind it."""

    series: SeriesRef
    raw: RawInput
    instances: tuple[Dataset, ...]


class Studies:
    def __init__(self, plane: DataPlane, settings: HospitalSettings):
        self.plane = plane
        self.settings = settings
        self.pacs = {name: Pacs(name, s) for name, s in settings.pacs.items()}
        fhir = settings.fhir
        # The token file reads as a client's does (its first token); no file: no token.
        self.fhir_token = client_token(fhir.token_file) if fhir and fhir.token_file else None

    def _pacs(self, name: str) -> Pacs:
        pacs = self.pacs.get(name)
        if pacs is None:
            known = ", ".join(sorted(self.pacs)) or "none is configured"
            raise ProtocolError(f"unknown PACS {shown(name)}; configured: {known}")
        return pacs

    @staticmethod
    def _tasks(named: Sequence[str]) -> list[str]:
        for t in named:
            CATALOG.task(t)  # UnknownTask names the known ones
        return list(dict.fromkeys(named)) or list(CATALOG.tasks)

    async def predict(self, request: StudyRequest) -> StudyResult:
        pacs = self._pacs(request.pacs)
        # The UID goes into the PACS's URL path: only a real UID, so no client steers the URL.
        if not is_uid(request.study_uid):
            raise ProtocolError(f"study UID {shown(request.study_uid)} is not a DICOM UID")
        tasks = self._tasks(request.tasks)
        extra = await self._extra_inputs(request)
        needed = {m for t in tasks for m in CATALOG.task(t).accepted}
        listed = await asyncio.to_thread(pacs.series, request.study_uid)
        routes = [route(s, self.settings.series_rules) for s in listed]
        by_modality: dict[str, list[Route]] = {}
        uses: dict[str, Route] = {}
        for r in routes:
            if not r.modality:
                uses[r.series.uid] = r
            elif r.modality not in needed:
                uses[r.series.uid] = r.ignored(
                    f"read as {r.modality}, which no requested task takes"
                )
            else:
                by_modality.setdefault(r.modality, []).append(r)
        reads = await asyncio.gather(
            *(self._read(pacs, request, rs, uses) for rs in by_modality.values())
        )
        read = {r.raw.modality: r for r in reads if r is not None}
        answerable, skipped = self._answerable(tasks, set(read), set(extra), bool(request.tasks))
        if not answerable:
            raise MissingModality(_nothing_to_answer(listed, read, skipped))
        results = await asyncio.gather(
            *(self._answer(request, t, read, extra) for t in answerable), return_exceptions=True
        )
        answers = []
        for task, result in zip(answerable, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                status, message = to_status(result)
                skipped.append(Skipped(task, status, message))
            else:
                used = tuple(read[m].series.uid for m in result.used if m in read)
                answers.append((result, used))
        if not answers:  # every task failed: the call fails as its first task did
            raise next(r for r in results if isinstance(r, Exception))
        findings = _findings(request, pacs, listed, read, answers)
        sr = await self._store_sr(pacs, findings, read) if request.store_sr else None
        bundle = build_bundle(findings)
        fhir = await self._send(bundle)
        return StudyResult(
            request_id=request.request_id,
            study_uid=request.study_uid,
            bundle_version=self.plane.bundle_version,
            answers=tuple(answers),
            skipped=tuple(skipped),
            series=tuple(uses[s.uid] for s in listed),
            fhir_bundle=bundle,
            fhir=fhir,
            sr=sr,
        )

    async def _extra_inputs(self, request: StudyRequest) -> dict[str, RawInput]:
        """Inputs sent along, checked on their encoders: a bad one fails the call (the client's
        input, not the PACS's)."""
        extra = {}
        for raw in request.inputs:
            CATALOG.modality(raw.modality)
            if raw.modality in extra:
                raise ProtocolError(f"two inputs for modality {raw.modality}")
            extra[raw.modality] = raw
        if extra:
            checked = await self.plane.embed(list(extra.values()), request.deadline)
            for e in checked:
                if isinstance(e, Exception):
                    raise e
        return extra

    async def _read(
        self, pacs: Pacs, request: StudyRequest, routes: list[Route], uses: dict[str, Route]
    ) -> _Read | None:
        """One modality's first readable series, in Series Number order: each is retrieved and
        run through its encoder (which caches the embedding for the answers)."""
        chosen: _Read | None = None
        for r in routes:
            if chosen is not None:
                number = chosen.series.number
                uses[r.series.uid] = r.ignored(
                    f"another {r.modality} series (number {number}) was used"
                )
                continue
            try:
                instances = await asyncio.to_thread(pacs.retrieve, request.study_uid, r.series)
                if not instances:
                    raise SeriesTooBig("the PACS sent no instances")
                raw = wire_input(r.modality, instances)
            except SeriesTooBig as e:
                uses[r.series.uid] = r.ignored(f"not read: {e}")
                continue
            except (InvalidDicomError, ValueError, AttributeError) as e:
                uses[r.series.uid] = r.ignored(f"not read: not valid DICOM ({type(e).__name__})")
                continue
            (embedded,) = await self.plane.embed([raw], request.deadline)
            if isinstance(embedded, Exception):
                status, message = to_status(embedded)
                if status is not Status.INVALID_ARGUMENT:
                    raise embedded  # the encoder's trouble, not the series'
                uses[r.series.uid] = r.ignored(f"unreadable: {message}")
                continue
            chosen = _Read(r.series, raw, tuple(instances))
            uses[r.series.uid] = r
        return chosen

    @staticmethod
    def _answerable(
        tasks: list[str], series: set[str], extra: set[str], named: bool
    ) -> tuple[list[str], list[Skipped]]:
        """Tasks the study can answer, and the others with why. With no task named, tasks that
        read none of what the study holds are not listed as skipped."""
        answerable, skipped = [], []
        for t in tasks:
            spec = CATALOG.task(t)
            present = (series | extra) & set(spec.accepted)
            why = None
            if not present & series:
                why = f"task {t!r} reads none of the study's series"
            else:
                try:
                    spec.check_modalities(present)
                except MissingModality as e:
                    why = str(e)
            if why is None:
                answerable.append(t)
            elif named or present & series:
                skipped.append(Skipped(t, Status.FAILED_PRECONDITION, why))
        return answerable, skipped

    async def _answer(
        self, request: StudyRequest, task: str, read: dict[str, _Read], extra: dict[str, RawInput]
    ) -> PredictResult:
        accepted = CATALOG.task(task).accepted
        inputs = [r.raw for m, r in read.items() if m in accepted]
        inputs += [raw for m, raw in extra.items() if m in accepted]
        call = PredictCall(request.request_id, task, tuple(inputs), deadline=request.deadline)
        return await self.plane.predict(call)

    async def _store_sr(
        self, pacs: Pacs, findings: StudyFindings, read: dict[str, _Read]
    ) -> SrOutcome:
        """The SR, stored by STOW-RS into the study. A failure is reported, never raised: the
        answers stand without it."""
        evidence = [ds for r in read.values() for ds in r.instances]
        try:
            sr = build_sr(findings, evidence)
            sop, series = str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID)
            stored = await asyncio.to_thread(pacs.store, [sr])
            why = ""
            if stored.failed or sop not in stored.stored:
                why = stored.failed[0][1] if stored.failed else "not in its stored list"
            # Orthanc 1.10's DICOMweb answers success for an instance its storage rules drop
            # (seen here): the SR counts as stored once the PACS lists it.
            elif not await asyncio.to_thread(pacs.holds, findings.study_uid, series, sop):
                why = "it acknowledged the store but does not list the SR"
        except Exception as e:  # the PACS's trouble, or an SR that cannot be written: reported
            status, message = to_status(e)
            if status is Status.INTERNAL:
                log.exception("SR not stored")
                message = f"SR not stored ({type(e).__name__})"
            return SrOutcome(False, message=message)
        if why:
            return SrOutcome(False, series, sop, f"PACS {shown(pacs.name)} refused the SR: {why}")
        return SrOutcome(True, series, sop)

    async def _send(self, bundle: dict) -> FhirOutcome | None:
        fhir = self.settings.fhir
        if fhir is None:
            return None
        return await asyncio.to_thread(
            post_bundle,
            fhir.url,
            bundle,
            token=self.fhir_token,
            timeout_s=fhir.timeout_s,
            attempts=fhir.attempts,
        )


def _nothing_to_answer(
    listed: list[SeriesRef], read: dict[str, _Read], skipped: list[Skipped]
) -> str:
    held = ", ".join(sorted({s.modality_code or "none" for s in listed}))
    readable = ", ".join(sorted(read)) or "nothing the encoders could read"
    why = f"; {skipped[0].message}" if skipped else ""
    return f"no task can be answered from this study: it holds {held} ({readable}){why}"


def _findings(
    request: StudyRequest,
    pacs: Pacs,
    listed: list[SeriesRef],
    read: dict[str, _Read],
    answers: list[tuple[PredictResult, tuple[str, ...]]],
) -> StudyFindings:
    first = next(iter(read.values())).instances[0]  # an answered task read at least one series
    return StudyFindings(
        study_uid=request.study_uid,
        patient_id=str(first.get("PatientID", "")),
        accession_number=str(first.get("AccessionNumber", "")),
        bundle_version=answers[0][0].bundle_version,
        wado_url=pacs.settings.url,
        findings=tuple(_finding(result, used) for result, used in answers),
        series=tuple(listed),
    )


def _finding(result: PredictResult, used: tuple[str, ...]) -> TaskFinding:
    p = result.prediction
    per_token = output_of(p.kind).per_token
    return TaskFinding(
        task=result.task,
        kind=OutputKind(p.kind),
        labels=tuple(p.labels),
        scores=() if per_token else tuple(float(s) for s in p.scores),
        predicted=tuple(p.predicted),
        modalities=tuple(result.used),
        series_uids=used,
        out_of_distribution=dict(result.out_of_distribution),
    )
