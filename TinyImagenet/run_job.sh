#!/usr/bin/env bash
# The paper's TinyImageNet commands (4 GPUs, batch 32 per GPU) for torchrun, from the repo root:
#   bash TinyImagenet/run_job.sh prepare | train_relu | train_maxmin | eval_relu | eval_maxmin
# NPROC (default 4) processes; on CPU add --cpu (gloo). Extra flags are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN="$PY -m torch.distributed.run --nproc_per_node=${NPROC:-4}"
job=${1:-help}
shift || true
case "$job" in
    prepare) "$PY" TinyImagenet/prepare_data.py --data_dir data "$@" ;;
    train_relu)
        $RUN TinyImagenet/train_tinyimagenet.py --model tinyimagenet_relux --sniter 1 --init 2.0 --epochs 250 \
            --rampup 125 --warmup 0 --batch_size 32 --epsilon_train 0.16 --lr 2.5e-4 --lr_scheduler exp \
            --sparse 0.01 --indices 0,6,12,14,17 \
            --prefix '../TinyImagenet/pretrained/tiny_relu' "$@" ;;
    train_maxmin)
        $RUN TinyImagenet/train_tinyimagenet.py --model tiny_clmaxmin --sniter 3 --epochs 250 --rampup 125 \
            --warmup 0 --batch_size 32 --epsilon_train 0.16 --lr 1e-4 --lr_scheduler exp --sparse 0.01 \
            --indices 0,6,12,14,17 \
            --prefix '../TinyImagenet/pretrained/tiny_maxmin' "$@" ;;
    eval_relu)
        "$PY" TinyImagenet/evaluate_tinyimagenet.py --model tinyimagenet_relux --epsilon 0.141 --test_batch_size 32 \
            --test_sniter 2000 --saved_model TinyImagenet/pretrained/tiny_relu_tinyimagenet_relux "$@" ;;
    eval_maxmin)
        "$PY" TinyImagenet/evaluate_tinyimagenet.py --model tiny_clmaxmin --epsilon 0.141 --test_batch_size 32 \
            --test_sniter 2000 --saved_model TinyImagenet/pretrained/tiny_maxmin_tiny_clmaxmin "$@" ;;
    help|-h|--help) sed -n '2,4p' "$0" ;;
    *) echo "TinyImagenet/run_job.sh: unknown job '$job'; the jobs are:" >&2
       sed -n '2,4p' "$0" >&2; exit 2 ;;
esac
