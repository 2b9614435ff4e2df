# The one ORFEAS image: generation, telemetry and the gateway are the same image started with different
# commands (deploy/kubernetes/ sets each container's command). It is not built in this repository's CI
# or tests (the machine has no container engine); build it where you have one:
#
#   docker build -t registry.example.org/orfeas:1.0 .
#
# torch comes from requirements.txt as pinned (a CUDA build that also runs on the CPU). No model
# weights are baked in: mount them and set HUNYUAN3D_MODEL_PATH (README "The hunyuan3d backend").

# --- the Studio's three.js modules (npm), copied as `make install` copies them
FROM node:22-bookworm-slim AS studio
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund
RUN set -eu; mkdir -p vendor/three; \
    for f in build/three.module.js build/three.core.js examples/jsm/loaders/GLTFLoader.js \
             examples/jsm/controls/OrbitControls.js examples/jsm/utils/BufferGeometryUtils.js \
             examples/jsm/utils/SkeletonUtils.js LICENSE; do \
      mkdir -p "vendor/three/$(dirname "$f")"; cp "node_modules/three/$f" "vendor/three/$f"; \
    done

# --- Python dependencies and the gRPC code
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt requirements-nodeps.txt ./
RUN pip install -r requirements.txt && pip install --no-deps -r requirements-nodeps.txt
COPY protos protos
COPY scripts/build_protos.sh scripts/build_protos.sh
RUN PYTHON=python scripts/build_protos.sh

# --- the runtime image
FROM python:3.11-slim-bookworm
# libgl/libglib: opencv-python-headless and pymeshlab's shared libraries.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 orfeas && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin orfeas
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY services services
COPY gateway gateway
COPY --from=build /app/pb pb
COPY --from=studio /src/vendor/three gateway/static/vendor/three
# The root filesystem is read-only in the pods: no bytecode written at run time, caches under /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    DATA_DIR=/data
RUN python -m compileall -q services gateway pb
USER 10001:10001
EXPOSE 5000 50051 50052 9101 9102
CMD ["python", "-m", "gateway.server"]
