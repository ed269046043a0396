#!/usr/bin/env bash
# Multi-host training on a SLURM GPU cluster: one task per node, all of a node's GPUs per task.
#
#   sbatch --nodes=8 --gpus-per-node=8 scripts/slurm_train.sh experiments/configs/small.py runs/small
#
# JAX reads the SLURM environment (jax.distributed.initialize auto-detection: coordinator = the
# first node, process count = tasks, process id = SLURM_PROCID). Set the mesh in the config or on
# the command line, e.g. --config.mesh.expert=8 --config.mesh.data=-1.
#SBATCH --job-name=dsv3_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG=${1:-experiments/configs/small.py}
WORKDIR=${2:-runs/slurm}
shift 2 || true

# Collective overlap on Hopper: let XLA schedule communication under compute and combine small
# collectives; NCCL over InfiniBand with GPUDirect RDMA.
export XLA_FLAGS="${XLA_FLAGS:-} \
  --xla_gpu_enable_latency_hiding_scheduler=true \
  --xla_gpu_enable_pipelined_all_gather=true \
  --xla_gpu_enable_pipelined_reduce_scatter=true \
  --xla_gpu_enable_pipelined_all_reduce=true \
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
  --xla_gpu_all_gather_combine_threshold_bytes=134217728 \
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864"
export NCCL_IB_DISABLE=0 NCCL_NET_GDR_LEVEL=PHB NCCL_CROSS_NIC=0
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export DSV3_DISTRIBUTED=auto      # dsv3_jax.distributed: use JAX's cluster auto-detection

srun --kill-on-bad-exit=1 python -m dsv3_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
