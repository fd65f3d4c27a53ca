# The relay node (and the demo upstream, same package) for docker-compose.yml.
#   docker build -t stream-relay:local .
#   docker run --rm -p 8081:8081 stream-relay:local serve --host 0.0.0.0 ...
# The image carries the package only; Envoy runs from the official envoyproxy/envoy image.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# What the wheel is built from (pyproject.toml force-includes envoy/ and the JS client, the
# demo page's script, as package data: hatchling stops if one is missing).
COPY pyproject.toml README.md ./
COPY envoy/envoy.yaml ./envoy/envoy.yaml
COPY clients/js/src/index.js ./clients/js/src/index.js
COPY extproc ./extproc
RUN pip install . && rm -rf /src

RUN useradd --system --create-home --uid 10001 relay
USER relay
WORKDIR /home/relay

# 50051: ext_proc + relay.v1 gRPC (Envoy only); 8081: HTTP front, /metrics, /healthz.
EXPOSE 50051 8081
ENTRYPOINT ["stream-relay"]
CMD ["serve", "--host", "0.0.0.0", "--grpc-port", "50051", "--http-port", "8081"]
