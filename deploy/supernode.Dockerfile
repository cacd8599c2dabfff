# A SuperNode of a SPES federation: the app at the commit you checked out, its locked
# dependencies, and the pinned node command (only this checkout's app runs in it).
#
# Build from a clean checkout of the commit the federation runs, at the repository root:
#   docker build -f deploy/supernode.Dockerfile -t spes-supernode .
# Run (one container per GPU; ca.crt and node.key read-only from the host, the work dir writable
# by uid 10001), with flower-supernode's options as in the README:
#   docker run --gpus '"device=0"' --restart on-failure -v /etc/spes:/etc/spes:ro -v /scratch/spes:/work \
#       spes-supernode --superlink coordinator.example.org:8000 --root-certificates /etc/spes/ca.crt \
#       --auth-supernode-private-key /etc/spes/node.key \
#       --node-config "partition-id=0 num-partitions=4 work-dir='/work'"
# The container only dials out (HTTPS to the coordinator); it publishes no port.
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 spes
WORKDIR /app

# The same installation as `make setup`: torch first (the CUDA build on PyPI), then the lock.
COPY requirements.lock ./
RUN python -m venv /venv \
    && /venv/bin/pip install --no-cache-dir --quiet torch==2.13.0 \
    && /venv/bin/pip install --no-cache-dir --quiet -r requirements.lock

COPY . .
RUN /venv/bin/pip install --no-cache-dir --quiet --no-deps -e . \
    && /venv/bin/python scripts/lock.py --check \
    && chown -R spes:spes /app

USER spes
ENV PATH=/venv/bin:$PATH \
    SPES_NODE_WORK_DIR=/work \
    PYTHONUNBUFFERED=1
VOLUME ["/work"]
ENTRYPOINT ["python", "-m", "client_app.supernode"]
