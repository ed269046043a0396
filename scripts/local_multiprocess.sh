#!/usr/bin/env bash
# The same multi-process job on one machine: N processes x D CPU devices each, gloo collectives,
# coordinator on 127.0.0.1 (this is what tests/multidevice/multiprocess.py runs).
#
#   scripts/local_multiprocess.sh 2 4 --config.mesh.data=2 --config.mesh.expert=4
set -euo pipefail
N=${1:-2}; D=${2:-4}; shift 2 || true
PORT=${PORT:-12355}
export XLA_FLAGS="--xla_force_host_platform_device_count=$D" JAX_PLATFORMS=cpu
for ((i = 0; i < N; i++)); do
  python -m dsv3_jax.train --config experiments/configs/tiny.py:quick --workdir runs/multiprocess \
    --coordinator=127.0.0.1:$PORT --num_processes=$N --process_id=$i "$@" &
done
wait
