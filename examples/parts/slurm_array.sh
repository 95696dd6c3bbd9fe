#!/bin/bash
# One conversion as a SLURM job array: N tasks write parts 0..N-1 of the output files into the parts area
# beside OUT_DIR (on a file system every node sees), then one dependent job checks them and puts OUT_DIR in
# place. Rerun a failed task with the same command: --resume keeps the files it had completed.
#
#   CKPT=/lustre/ckpts/run42 OUT=/lustre/hf/run42 N=16 sbatch --array=0-15 examples/parts/slurm_array.sh
#   sbatch --dependency=afterok:<array job id> --wrap "offline-bridge finalize /lustre/hf/run42"
#
#SBATCH --job-name=offline-bridge
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=01:00:00
set -euo pipefail
offline-bridge convert "$CKPT" "$OUT" --part "${SLURM_ARRAY_TASK_ID}/${N}" --resume --workers "${SLURM_CPUS_PER_TASK:-4}"
