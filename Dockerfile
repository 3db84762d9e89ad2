# syntax=docker/dockerfile:1
# The project's image: Ray + the pipeline + the Serve app. Not built in CI (no Docker engine there).
#   CPU (default):  docker build -t sentiment-ray .
#   GPU (CUDA 12.4): docker build --build-arg TORCH_INDEX=cu124 -t sentiment-ray:gpu .
#   Serve the champion of a registry mounted at /app/runs:
#     docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/runs:/app/runs" sentiment-ray
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# cpu, or a CUDA variant of the PyTorch wheel index (cu124, cu126, ...)
ARG TORCH_INDEX=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RAY_AUTH_MODE=token \
    HF_HUB_DISABLE_TELEMETRY=1

RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app
WORKDIR /app

# PyTorch first, from the index that matches the variant, so that the project's `torch>=2.4`
# requirement is already met and pip does not pull another build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}"

COPY pyproject.toml README.md constraints.txt ./
COPY ray_jobs ./ray_jobs
COPY serve_app ./serve_app
COPY tune_configs ./tune_configs
# The exact versions CI tested (constraints.txt); torch is already installed above.
RUN pip install -c constraints.txt . && chown -R app:app /app

USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

# Inside the container the proxy must listen on 0.0.0.0 to be reachable through the published
# port; publish it on the host's loopback (-p 127.0.0.1:8000:8000) unless you mean to expose it.
CMD ["python", "-m", "ray_jobs", "deploy", "--config", "tune_configs/quickstart.yaml", "--set", "serve.host=0.0.0.0", "--block"]
