# syntax=docker/dockerfile:1
# One image for the gateway and the workers: the command picks the role
#   docker run atomtune:cuda serve            (the default)
#   docker run atomtune:cuda worker --queues generate
# VARIANT picks the base: "cuda" (NVIDIA GPUs) or "cpu".
#   docker build --build-arg VARIANT=cpu -t atomtune:cpu .
ARG VARIANT=cuda

# The CUDA "base" image holds only the driver hooks; torch's wheel brings its own CUDA libraries.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

FROM python:3.11-slim-bookworm AS base-cpu

FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Build stage: everything goes into one virtual environment that the runtime stage copies.
FROM base AS build
ARG VARIANT
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and alone: its layer is the big one, and it changes only with the pin in pyproject.toml.
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
    else \
        pip install torch==2.13.0; \
    fi
COPY pyproject.toml README.md ./src/
COPY adapters ./src/adapters
COPY service ./src/service
COPY worker ./src/worker
RUN pip install ./src && rm -rf ./src

# Runtime stage: the interpreter, the virtual environment and nothing else of the build.
FROM base AS runtime
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin atomtune \
    && mkdir /data && chown atomtune:atomtune /data
COPY --from=build /opt/venv /opt/venv
# /data is a volume in docker-compose.yml; created here so a fresh named volume belongs to the user.
ENV PATH=/opt/venv/bin:$PATH \
    ATOMTUNE_DATA_DIR=/data \
    ATOMTUNE_HOST=0.0.0.0 \
    HF_HOME=/data/huggingface
USER atomtune
WORKDIR /home/atomtune
EXPOSE 8000 9101
ENTRYPOINT ["atomtune"]
CMD ["serve"]
