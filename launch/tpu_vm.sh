#!/usr/bin/env bash
# Runs mic_jax on a Cloud TPU VM or pod slice: create, set up, train, watch, delete.
#
#   launch/tpu_vm.sh [options] create|setup|data|train|logs|status|delete|all
#
# Every step prints the exact gcloud command before running it; with
# --dry_run (or DRY_RUN=1) it only prints. The same training command runs on
# every worker of the slice (--worker=all) with --multihost, so JAX finds
# its peers itself. Checkpoints go to the --workdir (use gs://), so a
# preempted spot slice is re-created and `train` resumes where it stopped.
#
# Options (defaults in brackets):
#   --name NAME              TPU name [mic-jax]
#   --project PROJECT        GCP project [gcloud's default]
#   --zone ZONE              zone [us-central2-b]
#   --accelerator TYPE       v4-8, v4-32, v5litepod-16, v5p-8, ... [v4-8]
#   --runtime VERSION        TPU software version [chosen from the type]
#   --spot                   spot (preemptible) capacity
#   --queued                 request through queued resources (waits for capacity)
#   --repo URL               git URL to install from [copy this checkout]
#   --config CONFIG          training config [configs/cross_modal.py]
#   --workdir DIR            run directory, gs://... for pods [required for train]
#   --data DIR               prepared data (gs://... is read in place)
#   --copy_data_to DIR       `data`: copy --data to this local dir on every worker
#   --extra "FLAGS"          more flags for python -m mic_jax.main
#   --dry_run                print the commands, run nothing
set -euo pipefail

NAME=mic-jax
PROJECT=""
ZONE=us-central2-b
ACCELERATOR=v4-8
RUNTIME=""
SPOT=0
QUEUED=0
REPO=""
CONFIG=configs/cross_modal.py
WORKDIR=""
DATA=""
COPY_DATA_TO=""
EXTRA=""
DRY_RUN=${DRY_RUN:-0}
REMOTE_DIR=mic_jax

usage() {  # The comment block at the top of this file.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-0}"
}

die() {
  echo "error: $*" >&2
  exit 2
}

ACTIONS=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == --*=* ]]; then  # --flag=value -> --flag value
    flag=${1%%=*}
    value=${1#*=}
    shift
    set -- "$flag" "$value" "$@"
  fi
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --accelerator) ACCELERATOR=$2; shift 2 ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --repo) REPO=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --copy_data_to) COPY_DATA_TO=$2; shift 2 ;;
    --extra) EXTRA=$2; shift 2 ;;
    --dry_run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    create|setup|data|train|logs|status|delete|all) ACTIONS+=("$1"); shift ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
[[ ${#ACTIONS[@]} -gt 0 ]] || usage 2

# The software version each TPU generation boots (Cloud TPU documentation).
if [[ -z "$RUNTIME" ]]; then
  case "$ACCELERATOR" in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) die "no default runtime for --accelerator=$ACCELERATOR; pass --runtime" ;;
  esac
fi

COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")

# One argument as a shell word: bare if safe, else --flag='value' / 'value'.
quote() {
  local arg=$1 flag="" sq="'\\''"
  if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$arg"
    return
  fi
  if [[ "$arg" =~ ^(--[a-z0-9-]+=)(.*)$ ]]; then
    flag=${BASH_REMATCH[1]}
    arg=${BASH_REMATCH[2]}
  fi
  printf "%s'%s'" "$flag" "${arg//\'/$sq}"
}

# Prints a command (quoted, so it can be pasted) and runs it unless dry.
run() {
  local line="+" arg
  for arg in "$@"; do
    line+=" $(quote "$arg")"
  done
  echo "$line"
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

on_workers() {  # on_workers WORKERS COMMAND
  run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" \
    --worker="$1" --command="$2"
}

create() {
  if [[ "$QUEUED" == 1 ]]; then
    local flags=(--node-id="$NAME" --accelerator-type="$ACCELERATOR"
                 --runtime-version="$RUNTIME")
    [[ "$SPOT" == 1 ]] && flags+=(--spot)
    run gcloud compute tpus queued-resources create "$NAME" "${COMMON[@]}" \
      "${flags[@]}"
    echo "# waiting for the slice: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE"
  else
    local flags=(--accelerator-type="$ACCELERATOR" --version="$RUNTIME")
    [[ "$SPOT" == 1 ]] && flags+=(--spot)
    run gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" "${flags[@]}"
  fi
}

setup() {
  local install
  if [[ -n "$REPO" ]]; then
    install="rm -rf $REMOTE_DIR && git clone --depth=1 $REPO $REMOTE_DIR"
  else
    # Ship this checkout (committed files only) to every worker.
    local archive
    archive=/tmp/${NAME}-src.tar.gz
    run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$NAME:~/src.tar.gz" \
      "${COMMON[@]}" --worker=all
    install="rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf src.tar.gz -C $REMOTE_DIR"
  fi
  on_workers all "$install && cd $REMOTE_DIR && python3 -m venv ~/venv && . ~/venv/bin/activate && pip install -U pip && pip install -e . 'jax[tpu]'"
}

data() {
  [[ -n "$DATA" ]] || die "data: give --data=gs://bucket/prepared"
  if [[ -z "$COPY_DATA_TO" ]]; then
    echo "# --data=$DATA is read in place by every worker (tf.io.gfile); nothing to copy"
    return
  fi
  on_workers all "mkdir -p $COPY_DATA_TO && gcloud storage cp -r '$DATA/*' $COPY_DATA_TO/"
}

train() {
  [[ -n "$WORKDIR" ]] || die "train: give --workdir (gs://... so every worker and a re-created slice see it)"
  local data_dir=${COPY_DATA_TO:-$DATA}
  local cmd="cd $REMOTE_DIR && . ~/venv/bin/activate && python -m mic_jax.main --config=$CONFIG --workdir=$WORKDIR --multihost"
  [[ -n "$data_dir" ]] && cmd+=" --config.data.dir=$data_dir"
  [[ -n "$EXTRA" ]] && cmd+=" $EXTRA"
  # nohup: the run survives the ssh session; each worker logs locally.
  on_workers all "nohup bash -c '$cmd' > ~/train.log 2>&1 &"
}

logs() {
  on_workers 0 "tail -n 100 -f ~/train.log"
}

status() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources describe "$NAME" "${COMMON[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$NAME" "${COMMON[@]}"
  fi
}

delete() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${COMMON[@]}" \
      --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
  fi
}

for action in "${ACTIONS[@]}"; do
  case "$action" in
    all) create; setup; [[ -n "$COPY_DATA_TO" ]] && data; train; logs ;;
    *) "$action" ;;
  esac
done
