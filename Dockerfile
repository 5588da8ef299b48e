# recdist on Ray 2.60 with CUDA: the image for `ray job submit` clusters and the KubeRay manifests in k8s/.
#
#   docker build -t REGISTRY/recdist:0.1.0 .            (README, section deploy)
#
# Base: rayproject/ray, tag {Ray version}-{Python}-{platform}; `-gpu` is the CUDA variant for Python 3.11, the
# Python of this project. For a reproducible build pin the digest too: --build-arg BASE_IMAGE=rayproject/ray:
# 2.60.0-py311-gpu@sha256:... (no registry is reachable from where this file was written, so no digest here).
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

# The base image's non-root user `ray` (uid 1000, group users = 100), numeric so that Kubernetes'
# runAsNonRoot can verify it; its conda Python lives in its home, so pip needs no root.
USER 1000:100
WORKDIR /home/ray

# Dependencies first, in their own layer: rebuilt only when the lock changes. torch==2.13.0 from PyPI is the
# CUDA build on Linux x86_64 (see requirements/lock.txt); no pip cache is kept in the layer.
COPY --chown=1000:100 requirements/lock.txt recdist/requirements/lock.txt
RUN pip install --no-cache-dir --disable-pip-version-check -r recdist/requirements/lock.txt

# The package itself, without touching the locked dependencies (COPY --chown makes recdist/ the user's, so pip
# can build in it).
COPY --chown=1000:100 pyproject.toml README.md recdist/
COPY --chown=1000:100 recdist/ recdist/recdist/
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps ./recdist \
    && rm -rf recdist/build recdist/recdist.egg-info

# Entrypoints for `ray job submit` / RayJob / the CronJob launcher, and the ready configs.
COPY --chown=1000:100 jobs/ recdist/jobs/
COPY --chown=1000:100 configs/ recdist/configs/
WORKDIR /home/ray/recdist

# numba's compiled kernels, cached in the image beside the installed modules: the offline quickstart (synthetic data,
# CPU, under a minute) and a nightly's `prepare --previous` of its data call every one with the pipeline's own
# argument types, where each new container (every nightly run) spent ~10 s compiling them. A node whose CPU model
# differs from the build machine's compiles anew. The `prepare --previous` splits by another rule (user) than
# its previous dataset (random), so it looks up the previous splits as such a nightly does (one split by the
# same rule skips that).
RUN recdist pipeline --config configs/quickstart.yaml --out /tmp/warm-kernels \
    && recdist prepare --config configs/quickstart.yaml --split user --out /tmp/warm-kernels/day2 \
        --previous /tmp/warm-kernels/data \
    && rm -rf /tmp/warm-kernels

# No data and no credentials in the image: ml-20m's licence forbids redistribution, so jobs download it
# (checksum-verified) into RECDIST_CACHE or read it from the user's bucket; S3 keys come from the pod's Secret.
# ARROW_DEFAULT_MEMORY_POOL: every process of the pod (Ray's workers too) takes Arrow's buffers from jemalloc, as
# `recdist` does for itself (recdist.storage.prefer_jemalloc).
ENV RECDIST_CACHE=/home/ray/.cache/recdist \
    RAY_TRAIN_V2_ENABLED=1 \
    ARROW_DEFAULT_MEMORY_POOL=jemalloc \
    PYTHONDONTWRITEBYTECODE=1

# The commit the image was built from, stamped into every output file (recdist.git_commit; the image has no .git):
# docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) ... Empty: outputs say nothing of a commit.
ARG GIT_COMMIT=""
ENV RECDIST_GIT_COMMIT=${GIT_COMMIT}

# No HEALTHCHECK: one image serves as Ray head, Ray worker, job submitter and CronJob launcher, so no single
# probe fits; Kubernetes ignores Docker HEALTHCHECKs anyway, and KubeRay gives head and workers their own
# liveness/readiness probes. NONE also drops any check inherited from the base image.
HEALTHCHECK NONE
