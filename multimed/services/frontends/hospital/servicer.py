"""`multimed.v1.Hospital` on the shared listener: PredictStudy converts at the edge and hands
the study to the hospital door's `Studies`, on the data plane."""

from __future__ import annotations

import time

import grpc

from multimed.services.frontends.grpc_common import Door, answer, call_info
from multimed.services.frontends.hospital.convert import (
    study_request_from_wire,
    study_response_to_wire,
)
from multimed.services.frontends.hospital.study import Studies
from multimed.v1 import multimed_pb2 as pb
from multimed.v1 import multimed_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Hospital"].full_name


class HospitalService(pb_grpc.HospitalServicer):
    def __init__(self, studies: Studies):
        self.studies = studies
        self.plane = studies.plane

    async def PredictStudy(self, request, context):
        call = call_info(self.plane, context, "PredictStudy", request.request_id)

        async def work(deadline: float):
            started = time.perf_counter()
            study = study_request_from_wire(request, call.request_id, deadline)
            result = await self.studies.predict(study)
            return study_response_to_wire(result, (time.perf_counter() - started) * 1000)

        modalities = (i.modality for i in request.inputs)
        return await answer(context, call, self.plane.run(call, "", modalities, work))


def register(server: grpc.aio.Server, door: Door) -> HospitalService:
    service = HospitalService(Studies(door.plane, door.hospital))
    pb_grpc.add_HospitalServicer_to_server(service, server)
    door.add_service(SERVICE)
    return service
