# syntax=docker/dockerfile:1
#
# tokenproxy: multi-stage build. The builder compiles a release binary (rustls with
# ring, so no OpenSSL is needed at build or run time); the runtime stage is
# debian:bookworm-slim with CA certificates and a non-root user.
#
#   docker build -t tokenproxy .
#   docker run -v $PWD/config/shared.toml:/etc/tokenproxy/tokenproxy.toml:ro \
#     -e DATABASE_URL=postgres://... -e TOKENPROXY_KEY=... tokenproxy

FROM rust:1-bookworm AS builder
WORKDIR /src
# Everything but target/ and .git/ (see .dockerignore): the manifest may name
# benches or tests whose files must exist for cargo to read it.
COPY . .
RUN cargo build --release --locked --bin tokenproxy \
    && strip target/release/tokenproxy

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tokenproxy \
    && useradd --system --uid 10001 --gid tokenproxy --home-dir /nonexistent --shell /usr/sbin/nologin tokenproxy \
    && mkdir -p /etc/tokenproxy
COPY --from=builder /src/target/release/tokenproxy /usr/local/bin/tokenproxy
COPY config/ /etc/tokenproxy/examples/

# The config is a mounted file; secrets come from the environment (DATABASE_URL,
# env:VAR references) and TOKENPROXY_<SECTION>__<KEY> overrides.
ENV TOKENPROXY_CONFIG=/etc/tokenproxy/tokenproxy.toml \
    RUST_LOG=info

USER 10001:10001
# Proxy and admin listeners (set server.listen / admin_listen to 0.0.0.0:… in the config).
EXPOSE 8080 9090

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["tokenproxy", "healthcheck"]

ENTRYPOINT ["tokenproxy", "serve"]
