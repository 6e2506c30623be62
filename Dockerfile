# The one Radflow image: `radflow worker`, `radflow receive`, `radflow dashboard`, `radflow migrate`.
# Build: docker build -t radflow .     (docker-compose.yml builds it for you)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch: from PyPI alone, Linux x86_64 gets the CUDA build and several GB of nvidia-* wheels.
# The PyTorch CPU index offers the CPU build of the version constraints.txt pins: 2.13.0+cpu
# satisfies ==2.13.0 and sorts above it, so pip takes it. For a GPU image, start from a CUDA
# base image and pass
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   (match the CUDA version)
# Radflow uses CUDA and mixed precision by itself whenever a GPU is visible.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

RUN useradd --create-home --uid 1000 radflow \
    && mkdir -p /data \
    && chown radflow:radflow /data

WORKDIR /app

# The big, rarely changing layer first so code edits do not reinstall torch.
COPY constraints.txt ./
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt torch

COPY pyproject.toml README.md ./
COPY platform ./platform
COPY flows ./flows
COPY dashboard ./dashboard
COPY cli ./cli
COPY demo ./demo
COPY migrations ./migrations
# A regular install: the migrations ship inside the package (radflow.migrations), so the image
# keeps no source tree; `radflow migrate` creates and upgrades the schema.
RUN pip install -c constraints.txt . && rm -rf /app/*

USER radflow
ENV RADFLOW_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8501 11112

CMD ["radflow", "--help"]
