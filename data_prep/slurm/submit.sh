#!/usr/bin/env bash
# Submit a sharded tokenize: an array job of SHARDS tasks (data_prep/slurm/tokenize.sbatch), and
# the merge (data_prep/slurm/merge.sbatch), which starts only once every task has succeeded.
#
#   bash data_prep/slurm/submit.sh SHARDS TOKENIZE_ARGUMENTS...
#   bash data_prep/slurm/submit.sh 64 --input 'slimpajama/train/**/*.jsonl.zst' \
#       --tokenizer-model data/tok.model --output-prefix data/train --domain-key meta.redpajama_set_name
#
# Run from the repository root. Environment (all optional): CPUS_PER_TASK (cores per shard,
# default 32), TIME_LIMIT (per shard, default 12:00:00), LOG_DIR (where the jobs' logs go,
# default .), PYTHON (default python); sbatch's own SBATCH_* variables (e.g. SBATCH_PARTITION,
# SBATCH_ACCOUNT) apply to both jobs.
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash data_prep/slurm/submit.sh SHARDS TOKENIZE_ARGUMENTS... (with --output-prefix P)" >&2
  exit 2
fi
shards="$1"
shift
prefix=""
arguments=("$@")
for ((i = 0; i < ${#arguments[@]}; i++)); do
  case "${arguments[i]}" in
    --output-prefix) prefix="${arguments[i + 1]:-}" ;;
    --output-prefix=*) prefix="${arguments[i]#*=}" ;;
  esac
done
if [[ -z "$prefix" ]]; then
  echo "submit.sh: the tokenize arguments need --output-prefix P (the merge writes P)" >&2
  exit 2
fi
here="$(dirname "$0")"

logs="${LOG_DIR:-.}"

array="$(sbatch --parsable --array="0-$((shards - 1))" --cpus-per-task="${CPUS_PER_TASK:-32}" \
  --time="${TIME_LIMIT:-12:00:00}" --output="$logs/%x-%A_%a.out" "$here/tokenize.sbatch" "$@")"
array="${array%%;*}"  # "id;cluster" on a multi-cluster setup
merge="$(sbatch --parsable --dependency="afterok:$array" --output="$logs/%x-%j.out" \
  "$here/merge.sbatch" --output-prefix "$prefix")"
merge="${merge%%;*}"
echo "submitted $shards shards as array job $array and the merge as job $merge (after all succeed)"
echo "watch: squeue -j $array,$merge; logs: $logs/tokenize-${array}_K.out, $logs/tokenize-merge-$merge.out"
