#!/bin/bash
# Run a study of experiments/ as a SLURM job array: one cell (grid entry) per array task.
#
#   N=$(python experiments/inresnet/small.py list | grep -c '^ *[0-9]')   # grid size
#   sbatch --array=0-$((N - 1)) scripts/slurm_study.sh experiments/inresnet/small.py
#   sbatch --array=0-9 scripts/slurm_study.sh experiments/diffai/schemes.py
#   # after the array: rebuild the report from the collected cells
#   python -m jaxdefense report experiments/diffai/schemes_results
#
# Every task runs `python SPEC [ARGS...] --index $SLURM_ARRAY_TASK_ID`: the experiment
# runner records its cell (git commit, exact command, config, machine) into the study's
# results.json under a file lock, so tasks on a shared file system can finish in any
# order; a task whose cell is already done skips it.  Without SLURM, set the index by
# hand: SLURM_ARRAY_TASK_ID=3 bash scripts/slurm_study.sh experiments/lad/small.py
#
#SBATCH --job-name=jaxdefense-study
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%A_%a.out
# For GPU cells add e.g.:  #SBATCH --gres=gpu:1

set -euo pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: sbatch --array=0-N $0 SPEC.py [ARGS...]   (SPEC: a study of experiments/)" >&2
  exit 2
fi
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "$0: SLURM_ARRAY_TASK_ID is not set: submit with sbatch --array=0-N, or set it by" \
       "hand to run one grid entry." >&2
  exit 2
fi
spec="$1"
shift
if [ ! -f "$spec" ]; then
  echo "$0: no study file $spec" >&2
  exit 2
fi

# Run from the submission folder (the repository root), where relative paths resolve.
cd "${SLURM_SUBMIT_DIR:-.}"
echo "task ${SLURM_ARRAY_TASK_ID} of job ${SLURM_ARRAY_JOB_ID:-(none)} on $(hostname): $spec"
exec "${PYTHON:-python}" "$spec" "$@" --index "$SLURM_ARRAY_TASK_ID"
