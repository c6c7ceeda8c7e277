# walfs in a container: `walfs run` restores /data from the replica on first boot, mounts
# it at /app-data, runs the app (the arguments after `--`), forwards SIGTERM to it, and
# on its exit uploads what is pending and exits with its status. docs/OPERATIONS.md,
# "Docker", shows how to run it; docs/docker-compose.yml is a compose file.
#
#   docker build -t walfs .
#   docker run --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor:unconfined \
#     -v app-data:/data -v walfs-staging:/var/lib/walfs -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#     walfs --replica 's3://bucket/app?region=eu-west-1' -- my-app --db /app-data/app.db

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin walfs \
    && strip target/release/walfs

FROM debian:bookworm-slim
# fuse3: fusermount3 and /etc/fuse.conf; sqlite3: for the app and for inspection;
# ca-certificates: https to S3.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 sqlite3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data /app-data /var/lib/walfs/staging
COPY --from=build /src/target/release/walfs /usr/local/bin/walfs
# /data: the databases (BACKING); /var/lib/walfs: staging, which must outlive the
# container like /data does (what waits there for upload survives a restart).
VOLUME ["/data", "/var/lib/walfs"]
# Settings may also come from a TOML file: -e WALFS_CONFIG=/etc/walfs.toml.
ENTRYPOINT ["walfs", "run", "--staging-dir", "/var/lib/walfs/staging", "--ready-file", "/run/walfs.ready", "/data", "/app-data"]
# Replace with: --replica URL [more walfs mount flags] -- APP ARGS...
CMD ["--", "sh", "-c", "echo 'give the replica and the app: docker run ... IMAGE --replica URL -- APP ARGS...' >&2; exit 2"]
