"""PredictStudy's wire messages <-> the hospital door's protocol-free types. The study's answers
are multimed.v1 PredictResponses, converted as the multimed.v1 door converts them."""

from __future__ import annotations

import json

from multimed.services.frontends.hospital.study import StudyRequest, StudyResult
from multimed.services.frontends.multimed_v1.convert import response_to_wire
from multimed.services.frontends.multimed_v1.inputs import input_from_wire
from multimed.v1 import multimed_pb2 as pb


def study_request_from_wire(
    request: pb.PredictStudyRequest, request_id: str, deadline: float
) -> StudyRequest:
    return StudyRequest(
        request_id=request_id,
        pacs=request.pacs,
        study_uid=request.study_instance_uid,
        tasks=tuple(request.tasks),
        inputs=tuple(input_from_wire(i) for i in request.inputs),
        store_sr=request.store_sr,
        deadline=deadline,
    )


def study_response_to_wire(result: StudyResult, server_ms: float) -> pb.PredictStudyResponse:
    response = pb.PredictStudyResponse(
        request_id=result.request_id,
        study_instance_uid=result.study_uid,
        bundle_version=result.bundle_version,
        fhir_bundle=json.dumps(result.fhir_bundle),
        timing=pb.Timing(server_ms=server_ms),
    )
    for prediction, series in result.answers:
        response.answers.append(
            pb.StudyAnswer(
                prediction=response_to_wire(prediction, server_ms),
                series_instance_uids=series,
            )
        )
    for s in result.skipped:
        response.skipped.append(
            pb.SkippedTask(task=s.task, code=s.status.grpc_code, message=s.message)
        )
    for use in result.series:
        response.series.append(
            pb.StudySeries(
                series_instance_uid=use.series.uid,
                dicom_modality=use.series.modality_code,
                series_number=use.series.number or 0,
                description=use.series.description,
                instances=use.series.instances,
                modality=use.modality,
                ignored_reason=use.reason,
            )
        )
    if result.sr is not None:
        sr = result.sr
        response.sr.CopyFrom(
            pb.SrOutcome(
                stored=sr.stored,
                series_instance_uid=sr.series_uid,
                sop_instance_uid=sr.sop_uid,
                message=sr.message,
            )
        )
    if result.fhir is not None:
        fhir = result.fhir
        response.fhir.CopyFrom(
            pb.FhirOutcome(
                sent=fhir.sent,
                http_status=fhir.status or 0,
                attempts=fhir.attempts,
                message=fhir.message,
            )
        )
    return response
