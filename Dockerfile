# The Percona PostgreSQL image with pgoom around its start (docs/container.md).
#
#   docker build -t pgoom .                                   # Percona ppg16 base
#   docker build --build-arg BASE_IMAGE=...-ppg17.x-postgres --build-arg PG_MAJOR=17 .
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...  # TLS-intercepting networks
#
# Needs BuildKit (the secret mount; Docker 23+ default, DOCKER_BUILDKIT=1 before). No
# `# syntax=` line: pulling a frontend image would need Docker Hub.
#
# Two ways in, both through `pgoom exec`:
#   - the image ENTRYPOINT: pgoom exec -- <base entrypoint> <CMD>   (docker run; as root with
#     --user 0 --cap-add SYS_RESOURCE it lowers the score, starts the monitor, drops to 26)
#   - the `patroni` shim first on PATH, for the operator's `patroni /etc/patroni` command.
ARG BASE_IMAGE=percona/percona-postgresql-operator:2.6.0-ppg16.8-postgres

# Build stage: the base itself, so pgoom is installed for the base's own python3 (3.9 on
# UBI 9) and architecture; pip and anything else this stage installs stay here.
FROM ${BASE_IMAGE} AS build
# Root only in this stage, to install pip if the base lacks it; the final stage is USER 26.
# hadolint ignore=DL3002
USER 0
COPY pyproject.toml README.md /tmp/pgoom-src/
COPY watcher /tmp/pgoom-src/watcher
COPY docker/build-pgoom.sh /tmp/build-pgoom.sh
RUN --mount=type=secret,id=ca,required=false \
    sh /tmp/build-pgoom.sh /tmp/pgoom-src /opt/pgoom

FROM ${BASE_IMAGE}
# The data directory the monitor watches (inotify) is /pgdata/pg<major> in Percona images.
ARG PG_MAJOR=16
ARG PATRONI=/usr/bin/patroni
ARG BASE_ENTRYPOINT=/opt/crunchy/bin/postgres-ha/bootstrap-postgres-ha.sh
LABEL org.opencontainers.image.title="pgoom on Percona PostgreSQL" \
      org.opencontainers.image.description="Keeps the PostgreSQL postmaster out of the OOM killer's reach"
COPY --from=build /opt/pgoom /opt/pgoom
COPY docker/patroni /opt/pgoom/shim/patroni
COPY docker/base-entrypoint /opt/pgoom/bin/base-entrypoint
ENV PATH=/opt/pgoom/shim:${PATH} \
    PGOOM_DATA_DIR=/pgdata/pg${PG_MAJOR} \
    PGOOM_PATRONI=${PATRONI} \
    PGOOM_BASE_ENTRYPOINT=${BASE_ENTRYPOINT}
# The base's user, unchanged: the operator's pods run with runAsNonRoot, and without root
# pgoom exec only exports PG_OOM_* and execs CMD. `docker run --user 0` enables the
# root-only steps; pgoom then drops to uid 26 itself (--user, PGOOM_USER).
USER 26
ENTRYPOINT ["/opt/pgoom/bin/pgoom", "exec", "--", "/opt/pgoom/bin/base-entrypoint"]
# Setting ENTRYPOINT clears the base's CMD: restate it (Percona: /usr/bin/patroni).
CMD ["/usr/bin/patroni"]
