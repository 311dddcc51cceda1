# syntax=docker/dockerfile:1
#
# The drover image: one binary for `drover serve`, `drover worker` and every other command.
#
#   docker build -t drover .
#
# The repository root is the build context (.dockerignore keeps target/, .git and .drover
# out of it). The runtime image is what the agents need besides drover itself: git (the
# workspaces of environments are git worktrees, diffs are taken with it), python3 (the
# built-in agents scaffold and test small Python projects, with its standard library only)
# and CA certificates (llm agents, webhooks, TLS brokers). tini is PID 1: drover handles
# SIGTERM itself and stops its children's process groups, but orphans an agent's tools
# leave behind are re-parented to PID 1 and must be reaped by someone.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# cmake: the fallback build of aws-lc-sys (rustls' crypto) on targets without a prebuilt path.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cargo registry and target directory are cache mounts, so the binary is copied out
# of the mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p drover \
    && install -m 0755 target/release/drover /usr/local/bin/drover

FROM debian:${DEBIAN_RELEASE}-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git python3 tini \
    && rm -rf /var/lib/apt/lists/*
# A fixed non-root uid/gid, so volumes shared by several containers (servers and workers)
# agree on ownership. The mount points exist with that owner, so a new named volume
# mounted there starts out writable by it.
RUN groupadd --system --gid 10001 drover \
    && useradd --system --uid 10001 --gid drover --home-dir /var/lib/drover \
        --shell /usr/sbin/nologin drover \
    && mkdir -p /var/lib/drover/runs /var/lib/drover/envs /var/lib/drover-shared \
    && chown -R drover:drover /var/lib/drover /var/lib/drover-shared
COPY --from=build /usr/local/bin/drover /usr/local/bin/drover
COPY --chmod=0755 deploy/bootstrap /usr/local/bin/drover-bootstrap
# The data directory (drover's own flag variable, not a config key); HOME for git.
ENV DROVER_DATA_DIR=/var/lib/drover \
    HOME=/var/lib/drover
WORKDIR /var/lib/drover
USER 10001:10001
EXPOSE 7070
ENTRYPOINT ["/usr/bin/tini", "--", "drover"]
CMD ["--help"]
