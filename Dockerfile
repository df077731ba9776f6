# The one image every pipeline stage runs in on Vertex AI, and the serving container of uploaded models
# (`rlhf serve`). Build and push it, then pass it to `rlhf submit --image` (see README.md, "Vertex AI").
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    RLHF_CACHE_DIR=/opt/rlhf-cache

# The CUDA build of the pinned torch goes in first, so installing the package keeps it (the PyPI wheel
# it would otherwise pick is the CPU one). The version must equal the pin in pyproject.toml.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/rlhf
COPY pyproject.toml README.md pipeline.yaml ./
COPY rlhf rlhf
COPY pipeline pipeline
COPY components components
# The default model is converted at build time, so stages and serving start without fetching it.
RUN pip install . && rlhf prepare-model

# Vertex AI serving sends requests to AIP_HTTP_PORT, 8080 unless it says otherwise.
EXPOSE 8080
