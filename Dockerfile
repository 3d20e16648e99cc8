# syntax=docker/dockerfile:1
# The service image: built in a Rust image, run as a non-root user in a slim Debian one.
# `docker compose up` builds it; by hand: docker build -t todo-service .

ARG RUST_VERSION=1.95.0
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so a source-only change reuses the cached dependency layer.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
COPY migrations ./migrations
# The commit the release names (build.rs; .git is not in the build context):
# docker build --build-arg TODO_SERVICE_COMMIT=$(git rev-parse --short=12 HEAD) .
ARG TODO_SERVICE_COMMIT=
# touch: make cargo rebuild the crate itself, not reuse the placeholder's artefacts.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
    && strip target/release/todo-service

FROM debian:bookworm-slim AS runtime
# curl only for the container healthcheck; ca-certificates for an https OTLP endpoint.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin todo
COPY --from=build /src/target/release/todo-service /usr/local/bin/todo-service
USER 10001:10001
# Every interface, so the service refuses to start until AUTH_MODE is chosen: jwt with
# AUTH_JWT_SECRET or a JWK Set (docker-compose.yml), or none to serve without authentication.
ENV LISTEN_ADDR=0.0.0.0:8080 \
    LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
# Exec form: the service runs as PID 1, so `docker stop`'s SIGTERM reaches it directly and it drains
# within SHUTDOWN_TIMEOUT (keep the stop grace period above that; compose sets it).
ENTRYPOINT ["/usr/local/bin/todo-service"]
CMD ["serve"]
