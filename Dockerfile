# The Python services (API, worker, scheduler) in one image; docker-compose.yml picks the command.
FROM python:3.11-slim

# Containers log JSON lines for a log collector (LOG_FORMAT=console for a person at a terminal).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOG_FORMAT=json

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .
# The code stays owned by root (read-only for the service); it runs as an unprivileged user.
RUN useradd --system --uid 10001 --no-create-home app
USER app

EXPOSE 8000
CMD ["uvicorn", "app:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--no-access-log", "--log-config", "uvicorn_logging.json"]
