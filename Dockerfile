# syntax=docker/dockerfile:1
# One image for every app service: `pipeline migrate | worker | scheduler | serve` (see docker-compose.yml).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# The locked runtime dependencies first, every artifact's sha256 checked (see scripts/lock): this
# layer is rebuilt only when requirements/runtime.txt changes, not on every source edit.
COPY requirements/runtime.txt requirements/runtime.txt
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r requirements/runtime.txt
COPY . .
RUN /opt/venv/bin/pip install --no-deps .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 pipeline \
    && useradd --system --uid 10001 --gid pipeline --create-home --home-dir /home/pipeline pipeline
COPY --from=build /opt/venv /opt/venv
USER pipeline
# Writable working directory: the embedded defaults (SQLite file, local blob directory) land here.
WORKDIR /home/pipeline
EXPOSE 8000
ENTRYPOINT ["pipeline"]
CMD ["--help"]
