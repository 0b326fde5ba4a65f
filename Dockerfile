# The Percona PostgreSQL image with pgoom around its start (docs/container.md).
#
#   docker build -t oom-protected-postgres .                 # Percona ppg16 base
#   docker build --build-arg BASE_IMAGE=...-ppg17.x-postgres --build-arg PG_MAJOR=17 .
#   docker buildx build --platform linux/amd64,linux/arm64 .  # both architectures
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...  # TLS-intercepting networks
#
# Needs BuildKit (the secret mount and $BUILDPLATFORM; Docker 23+ default, DOCKER_BUILDKIT=1
# before). No `# syntax=` line: pulling a frontend image would need Docker Hub.
#
# Nothing runs in the base but its own python3: pip works in a separate stage on the build
# machine's architecture (never emulated) and fetches wheels for the target's platform and
# Python; the standard library unpacks them; the base's python3 compiles and checks them. No
# pip, compiler or package manager ever runs in, or stays in, the final image.
#
# Two ways in, both through `pgoom exec`:
#   - the image ENTRYPOINT: pgoom exec -- <base entrypoint> <CMD>   (plain `docker run`: as
#     uid 26 it protects relatively, see docs/container.md; as root with --user 0 --cap-add
#     SYS_RESOURCE it lowers the score, starts the monitor, drops to 26)
#   - the `patroni` shim first on PATH, for the operator's `patroni /etc/patroni` command.
ARG BASE_IMAGE=percona/percona-postgresql-operator:2.6.0-ppg16.8-postgres
# Any image with python3 and pip. Its python3 is the base's version (3.9) so that the
# environment markers of the dependencies (tomli below 3.11) read as they will at run time.
ARG PIP_IMAGE=python:3.9-slim

FROM --platform=$BUILDPLATFORM ${PIP_IMAGE} AS wheels
ARG TARGETARCH
ARG PYTHON_VERSION=3.9
COPY pyproject.toml README.md /src/
COPY watcher /src/watcher
COPY docker/fetch-wheels.sh docker/unpack-wheels.py /build/
# Under /tmp: the stage runs as whichever user PIP_IMAGE names. COPY --from below gives the
# files to root whoever wrote them here.
RUN --mount=type=secret,id=ca,required=false,mode=0444 \
    sh /build/fetch-wheels.sh /src /tmp/wheels "${TARGETARCH}" "${PYTHON_VERSION}" \
    && python3 -I /build/unpack-wheels.py /tmp/wheels /tmp/pgoom-lib

FROM ${BASE_IMAGE}
# The data directory the monitor watches (inotify) is /pgdata/pg<major> in Percona images.
ARG PG_MAJOR=16
ARG PATRONI=/usr/bin/patroni
ARG BASE_ENTRYPOINT=/opt/crunchy/bin/postgres-ha/bootstrap-postgres-ha.sh
LABEL org.opencontainers.image.title="pgoom on Percona PostgreSQL" \
      org.opencontainers.image.description="Keeps the PostgreSQL postmaster out of the OOM killer's reach"
COPY --from=wheels /tmp/pgoom-lib /opt/pgoom/lib
COPY docker/patroni /opt/pgoom/shim/patroni
COPY docker/base-entrypoint /opt/pgoom/bin/base-entrypoint
COPY docker/finish.py /opt/pgoom/finish.py
# Root for this one step: /opt/pgoom belongs to root, so the database user cannot change
# what root runs from it. The base's python3 writes the launcher, compiles and checks.
# hadolint ignore=DL3002
USER 0
RUN ["python3", "-I", "/opt/pgoom/finish.py", "/opt/pgoom"]
ENV PATH=/opt/pgoom/shim:${PATH} \
    PGOOM_DATA_DIR=/pgdata/pg${PG_MAJOR} \
    PGOOM_PATRONI=${PATRONI} \
    PGOOM_BASE_ENTRYPOINT=${BASE_ENTRYPOINT}
# The base's user, unchanged: the operator's pods run with runAsNonRoot, and without root
# pgoom exec protects relatively (children above the postmaster) and execs CMD.
# `docker run --user 0` enables the root-only steps; pgoom then drops to uid 26 itself
# (--user, PGOOM_USER).
USER 26
ENTRYPOINT ["/opt/pgoom/bin/pgoom", "exec", "--", "/opt/pgoom/bin/base-entrypoint"]
# Setting ENTRYPOINT clears the base's CMD: restate it (Percona: /usr/bin/patroni).
CMD ["/usr/bin/patroni"]
