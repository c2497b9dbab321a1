#!/bin/bash
# `sere pretrain` on several machines under SLURM (docs/many-gpus.md#slurm): one torchrun per
# machine, which starts one process per GPU; the machines meet through torchrun's c10d
# rendezvous on the job's first machine. Submitting the same script again continues the run
# (--resume auto), after a time limit, a pre-emption or a failure alike.
#
#   DATA=/data/imagenet/train sbatch scripts/slurm_pretrain.sh
#   DATA=/data/imagenet/train CONFIG=vit_base_ibot_sere RUN=runs/vitb \
#       sbatch --nodes 8 scripts/slurm_pretrain.sh train.parallel=fsdp train.precision=bf16
#
# Settings after the script's name go to `sere pretrain` as they are. RUN must be on storage
# that every machine sees and that outlives the job.
#
#SBATCH --job-name=sere
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out

set -euo pipefail

: "${DATA:?set DATA to the image folder, e.g. DATA=/data/imagenet/train}"
CONFIG=${CONFIG:-vit_small_ibot_sere}
RUN=${RUN:-runs/${SLURM_JOB_NAME}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
PORT=${PORT:-29500}
# the rendezvous endpoint: the first machine of the job
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# every restart attempt gets a store of its own (docs/many-gpus.md#elastic-restarts)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# SIGTERM (the time limit's, or --signal's 300 s before it) reaches each torchrun, which
# passes it to its processes: they finish the step, write a checkpoint and exit 0.
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" \
    --max-restarts 3 \
    -m sere.cli pretrain --config "$CONFIG" data.path="$DATA" train.output_dir="$RUN" \
    --resume auto "$@"
