# MultiMed Serve: one image for every node of a Ray cluster (docker-compose.yml runs the head and
# the workers from it). CPU by default:
#   docker build -t multimed-serve .
# CUDA: the same Python base with torch's CUDA build. PyPI's Linux x86_64 torch wheel is that build
# (for torch 2.13 it pulls the CUDA 13 runtime as nvidia-* wheels); the host supplies the driver
# (one that supports that CUDA) through the NVIDIA Container Toolkit, so no CUDA base image:
#   docker build -t multimed-serve:cuda --build-arg TORCH_INDEX=https://pypi.org/simple .
# Without training the default bundle (mount one at /opt/multimed/artifacts/default-bundle on
# every node instead):
#   docker build -t multimed-serve --build-arg BUNDLE=untrained .
ARG BASE=python:3.11-slim-bookworm
ARG BUNDLE=trained

FROM ${BASE} AS base
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# nginx: the gateway's native front (`multimed serve --front`), which refuses overload itself.
RUN apt-get update && apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/*
# torch first, from the chosen index, so that the project's `torch>=` range is already met and
# pulls nothing else (as the Makefile's install does). Its own layer: code changes keep it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md /tmp/src/
COPY protos /tmp/src/protos
COPY multimed /tmp/src/multimed
# As the Makefile: install the project (its pins choose grpcio-tools and protobuf), generate the
# multimed.v1 stubs from protos/ with that grpcio-tools (stubs newer than the protobuf runtime
# refuse to load), then install again, stubs included.
RUN cd /tmp/src \
 && pip install . \
 && python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. \
      protos/multimed/v1/multimed.proto \
 && pip install --no-deps --force-reinstall . \
 && pip check \
 && rm -rf /tmp/src
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin multimed
WORKDIR /opt/multimed

# The default bundle, trained on the synthetic cohort (a few minutes; needs the `train` extra,
# whose packages the served image does not carry: pip adds them to the installed project). Malloc
# keeps batch buffers, as in the Makefile's training.
FROM base AS trained
RUN pip install "multimed-serve[train]" \
 && MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 \
    multimed -v train --out artifacts/default-bundle

FROM base AS untrained
RUN mkdir -p artifacts/default-bundle

FROM ${BUNDLE} AS bundle

FROM base
COPY --from=bundle /opt/multimed/artifacts /opt/multimed/artifacts
# gRPC (multimed.v1, KServe v2, health, reflection), /metrics, Ray's dashboard, Ray's GCS (head).
EXPOSE 8001 8002 8265 6379
USER multimed
# No HEALTHCHECK here: workers run this image too and serve no gRPC; docker-compose.yml checks the
# head's gRPC health. What each container runs is set there (`ray start`, `multimed serve`).
CMD ["multimed", "--help"]
