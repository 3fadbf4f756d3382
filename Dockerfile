# The contact-deletion service: one image, one process per container
# (docker-compose.yml runs it as migrate, api, relay, worker and dispatcher).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the wheel is built from (see .dockerignore); README.md is the package's readme.
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install . \
    && rm -rf /app/service /app/build /app/*.egg-info

# An unprivileged user; ./data (the default DATA_DIR) is the only place it writes.
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home app \
    && mkdir -p /app/data \
    && chown app:app /app/data
USER app

# DATA_DIR: an installed package's default would be ~/.local/share (not writable here).
ENV HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8080 \
    DATA_DIR=/app/data \
    LOG_FORMAT=json
EXPOSE 8080

CMD ["contact-deletion", "run"]
