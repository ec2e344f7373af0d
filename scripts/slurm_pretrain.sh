#!/usr/bin/env bash
# Shared body of the sbatch files: builds the launch command for one shape, forwards pre-emption signals, and
# requeues the job when the training processes checkpointed and stopped (exit code 3) or a signal arrived.
#
#   slurm_pretrain.sh torchrun    one task per node running torchrun (1 node: --standalone; N nodes: c10d rendezvous
#                                 on the first node of the allocation)
#   slurm_pretrain.sh srun        one task per GPU; ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
#
# Environment: RECIPE (vit_s | vit_b | densenet121 | finetune_vit_s | finetune_densenet121 | linprobe_vit_s |
# finetune_covidx_vit_s | finetune_node21_vit_s | segment_unet | segment_vit_s; all but the first three also PRETRAINED,
# the NIH ones TRAIN_LIST, VAL_LIST, TEST_LIST, the segment ones DATASET, MASK_SUFFIX, INPUT_SIZE, DECODER_INIT), SAVE_DIR, DATA_PATH, BATCH_SIZE, ACCUM_ITER, GPUS_PER_NODE,
# MAX_RESTARTS (torchrun shape, default 1), PYTHON, EXTRA_ARGS (appended last, so they override the recipe).
set -euo pipefail
SHAPE="${1:?usage: slurm_pretrain.sh torchrun|srun}"
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$REPO"
source scripts/recipes.sh
PYTHON="${PYTHON:-python3}"
SAVE_DIR="${SAVE_DIR:-runs/${RECIPE:-vit_s}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}"
export MASTER_PORT="${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
TRAIN_ARGS=("${RECIPE_ARGS[@]}" --data_path "${DATA_PATH:-data}" --output_dir "$SAVE_DIR" --log_dir "$SAVE_DIR")
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

case "$SHAPE" in
    torchrun)
        if (( ${SLURM_NNODES:-1} == 1 )); then
            rendezvous=(--standalone)
        else
            rendezvous=(--nnodes="$SLURM_NNODES" --rdzv_backend=c10d --rdzv_id="$SLURM_JOB_ID"
                        --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT")
        fi
        # --max-restarts: a crashed worker makes torchrun restart the whole group (every node), which resumes from
        # checkpoint-last in seconds, instead of failing the job and waiting for a requeue. Each node's agent counts
        # its own restarts (one whose workers were still alive counts none), so the restarted group must not share
        # the previous round's store: a fresh one per round (PRETRAIN.md section 6)
        export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
        cmd=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run "${rendezvous[@]}"
             --max-restarts="${MAX_RESTARTS:-1}" --nproc_per_node="$GPUS_PER_NODE" "$SCRIPT") ;;
    srun)
        cmd=(srun --kill-on-bad-exit=1 "$PYTHON" "$SCRIPT") ;;
    *) echo "slurm_pretrain.sh: unknown shape '$SHAPE'" >&2; exit 2 ;;
esac

echo "[$(date +%FT%T)] job $SLURM_JOB_ID ($SHAPE, ${SLURM_NNODES:-1} node(s), master $MASTER_ADDR:$MASTER_PORT): ${cmd[*]}"
preempted=0
forward() {  # SLURM's --signal=B:USR1@T (or a pre-emption SIGTERM) reached this shell: let training checkpoint
    preempted=1
    echo "[$(date +%FT%T)] $1 received: asking the training processes to checkpoint and stop"
    # Signal the step's tasks, not srun: srun answers SIGTERM by aborting the step before anyone can save.
    scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || kill -TERM "$child" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
"${cmd[@]}" "${TRAIN_ARGS[@]}" "${EXTRA[@]}" &
child=$!
while true; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break  # a trap interrupted wait; keep waiting for the step to end
done
if (( rc == 3 || preempted )); then
    echo "[$(date +%FT%T)] checkpoint written (exit $rc); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "[$(date +%FT%T)] training exited with $rc"
exit "$rc"
