#!/bin/bash
# TrOPD on-policy distillation, Llama-3 70B teacher -> 8B student (recipe llama3_70b_to_8b: teacher
# TP=8, student TP=4, data parallel over the rest),
# on N nodes x 8 GPUs. Submit from the repository root:
#
#     sbatch slurm/tropd_70b.sh                                   # 4 nodes, defaults below
#     sbatch --nodes=8 --account=A --partition=P slurm/tropd_70b.sh
#     TROPD_OVERRIDES="data.path=/lustre/prompts.jsonl schedule.steps=400" sbatch slurm/tropd_70b.sh
#
# Command-line sbatch options override the #SBATCH lines below. The job resumes from the latest
# checkpoint in the checkpoint directory, so resubmitting the same job (same name, same
# directories) continues a run.
#
# Environment knobs (read at job start; sbatch exports the submitting shell's environment):
#   TROPD_RECIPE          recipe: a built-in name, package.module:function or path/to/file.py:function
#                         (relative to TROPD_REPO; importable on every node)   [llama3_70b_to_8b]
#   TROPD_OVERRIDES       extra dotted key=value recipe overrides, space-separated (no spaces
#                         inside a value), passed last to `launch.train`   [empty]
#   TROPD_REPO            repository root the job runs in              [$SLURM_SUBMIT_DIR]
#   TROPD_PYTHON          python executable (in the container when TROPD_CONTAINER is set) [python]
#   TROPD_GPUS_PER_NODE   GPUs per node the ranks use; 0 = CPU ranks (tests)   [8]
#   TROPD_NPROC_PER_NODE  training processes (Slurm tasks) per node    [TROPD_GPUS_PER_NODE; if 0,
#                         the job's --ntasks-per-node]
#   TROPD_RUN_DIR         where the run's files go                     [$TROPD_REPO/runs/$SLURM_JOB_NAME]
#   TROPD_CHECKPOINT_DIR  -> checkpoint.dir=...  (resume point)        [$TROPD_RUN_DIR/checkpoints]
#   TROPD_LOG_DIR         -> logging.tensorboard_dir=...               [$TROPD_RUN_DIR/tensorboard]
#                         (checkpoint.dir= / logging.tensorboard_dir= in TROPD_OVERRIDES win over these)
#   TROPD_CONTAINER       container image: run the ranks with `srun --container-image` (pyxis),
#                         TROPD_REPO mounted at the same path          [unset: no container]
#   TROPD_CONTAINER_MOUNTS extra pyxis mounts, comma-separated src:dst (data, checkpoints outside
#                         the repository)                              [empty]
#   TROPD_REQUEUE         1: on exit 75 (preempted, checkpoint saved) `scontrol requeue` the job
#                         and exit 0; 0: exit 75                      [1]
#   MASTER_PORT           torch.distributed rendezvous port on the first node (MASTER_ADDR)
#                                                                      [20000 + job id % 20000]
#   OMP_NUM_THREADS [1]  NCCL_DEBUG [WARN]  TORCH_NCCL_ASYNC_ERROR_HANDLING [1]  CUDA_DEVICE_MAX_CONNECTIONS [1]
#   Anything else in the environment (NCCL_IB_*, NCCL_SOCKET_IFNAME, HF_HOME, ...) reaches the ranks as is.
#
# Launch: one Slurm task per GPU (srun starts `python -m launch.train` itself; RANK, WORLD_SIZE,
# LOCAL_RANK come from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), not torchrun per node:
#   - srun forwards SIGUSR1/SIGTERM to every task of the step on every node, so each training
#     process gets the signal directly. Slurm signals every process of a step, so under
#     torchrun its agent gets it too: it dies at once on SIGUSR1 (not in its handled signals
#     by default), and on SIGTERM it kills its workers 30 s after forwarding it, less than a
#     70B checkpoint takes.
#   - srun exits with the highest exit status of the tasks, so 75 ("preempted; checkpoint
#     saved") reaches this script. torchrun exits 1 when a worker exits 75.
# Preemption: --signal=B:USR1@900 sends SIGUSR1 to this batch shell 15 minutes (up to a minute
# more: Slurm's timer resolution) before the time limit: time to finish a step of 128 prompts x
# 4 rollouts and write the checkpoint; raise it if a step takes longer. The trap below forwards
# it to srun, hence to every rank; the ranks finish the step, checkpoint and exit 75; the job
# requeues itself (Slurm delays a requeued job's start by about 2 minutes) and resumes from the
# checkpoint with a fresh time limit. By hand: `scancel --batch --signal=USR1 <job>` (the same
# path) or `scancel --signal=USR1 <job>` (straight to the ranks). Plain `scancel` (SIGTERM) also
# makes the ranks checkpoint (within KillWait) but does not requeue.
# Log: slurm-<job name>-<job id>.out in the submit directory, appended to across requeues
# (sbatch does not create folders and a job whose --output folder is missing fails without a
# word: for another folder, create it first: mkdir -p runs/slurm && sbatch --output=runs/slurm/%x-%j.out ...).
#
#SBATCH --job-name=tropd_70b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

TROPD_RECIPE=${TROPD_RECIPE:-llama3_70b_to_8b}
TROPD_OVERRIDES=${TROPD_OVERRIDES:-}
TROPD_REPO=$(cd "${TROPD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" && pwd)
TROPD_PYTHON=${TROPD_PYTHON:-python}
TROPD_GPUS_PER_NODE=${TROPD_GPUS_PER_NODE:-8}
if ((TROPD_GPUS_PER_NODE > 0)); then
    TROPD_NPROC_PER_NODE=${TROPD_NPROC_PER_NODE:-$TROPD_GPUS_PER_NODE}
else
    TROPD_NPROC_PER_NODE=${TROPD_NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
fi
TROPD_RUN_DIR=${TROPD_RUN_DIR:-$TROPD_REPO/runs/${SLURM_JOB_NAME:-tropd}}
TROPD_CHECKPOINT_DIR=${TROPD_CHECKPOINT_DIR:-$TROPD_RUN_DIR/checkpoints}
TROPD_LOG_DIR=${TROPD_LOG_DIR:-$TROPD_RUN_DIR/tensorboard}
TROPD_CONTAINER=${TROPD_CONTAINER:-}
TROPD_CONTAINER_MOUNTS=${TROPD_CONTAINER_MOUNTS:-}
TROPD_REQUEUE=${TROPD_REQUEUE:-1}

# the user's overrides; checkpoint.dir / logging.tensorboard_dir among them replace the knobs
read -r -d '' -a user_overrides <<<"$TROPD_OVERRIDES" || true  # split on blanks and newlines
overrides=()
for kv in ${user_overrides[@]+"${user_overrides[@]}"}; do
    case $kv in
        checkpoint.dir=*) TROPD_CHECKPOINT_DIR=${kv#*=} ;;
        logging.tensorboard_dir=*) TROPD_LOG_DIR=${kv#*=} ;;
        *) overrides+=("$kv") ;;
    esac
done
overrides=("checkpoint.dir=$TROPD_CHECKPOINT_DIR" "logging.tensorboard_dir=$TROPD_LOG_DIR"
           ${overrides[@]+"${overrides[@]}"})

nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
world=$((nodes * TROPD_NPROC_PER_NODE))
cpus_per_task=$(( ${SLURM_CPUS_ON_NODE:-$TROPD_NPROC_PER_NODE} / TROPD_NPROC_PER_NODE ))
((cpus_per_task > 0)) || cpus_per_task=1

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # rank 0's node
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export PYTHONUNBUFFERED=1
if ((TROPD_GPUS_PER_NODE == 0)); then
    export CUDA_VISIBLE_DEVICES=""  # CPU ranks (gloo)
fi

log() { echo "[tropd_70b $(date '+%F %T')] $*"; }

mkdir -p "$TROPD_CHECKPOINT_DIR" "$TROPD_LOG_DIR"
log "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${nodes} node(s) [${SLURM_JOB_NODELIST}]:" \
    "${world} ranks (${TROPD_NPROC_PER_NODE}/node, ${TROPD_GPUS_PER_NODE} GPUs/node), rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
log "recipe ${TROPD_RECIPE}; repository ${TROPD_REPO}${TROPD_CONTAINER:+; container ${TROPD_CONTAINER}}"
log "checkpoints: ${TROPD_CHECKPOINT_DIR} (resumes from its latest)"
log "tensorboard: ${TROPD_LOG_DIR}; this log: $(readlink -f /proc/$$/fd/1 2>/dev/null || echo stdout)"

# --kill-on-bad-exit=0: with 1, the first rank to exit 75 gets the others SIGTERMed while they
# tear down (handlers restored): they die with 143, srun reports the highest code (143) and
# the job is not requeued. --wait=120: once one rank has exited, the rest get 120 s before
# they are killed (bounds a hang after a crash; a preempted run's ranks exit within seconds).
srun_args=(--nodes="$nodes" --ntasks="$world" --ntasks-per-node="$TROPD_NPROC_PER_NODE"
           --cpus-per-task="$cpus_per_task" --kill-on-bad-exit=0 --wait=120 --chdir="$TROPD_REPO")
if [[ -n $TROPD_CONTAINER ]]; then
    srun_args+=(--container-image="$TROPD_CONTAINER" --container-workdir="$TROPD_REPO"
                --container-mounts="$TROPD_REPO:$TROPD_REPO${TROPD_CONTAINER_MOUNTS:+,$TROPD_CONTAINER_MOUNTS}")
fi
# each task: torch.distributed env:// variables from its Slurm ids, then exec python (no shell
# left between srun and the training process). SIGUSR1 starts out ignored (inherited through
# exec) until the trainer installs its handler: a rank still importing would otherwise be
# killed by it (what happens when the job starts with less time left than the --signal lead).
# shellcheck disable=SC2016
rank_env='trap "" USR1; export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS'
rank_env+=" LOCAL_WORLD_SIZE=$TROPD_NPROC_PER_NODE"'; exec "$@"'

# SIGUSR1 (the --signal warning, `scancel --batch --signal=USR1`): forward it, requeue on exit 75.
# SIGTERM (scancel, Slurm preemption, the time limit reached): Slurm sends it to the ranks
# as well; they checkpoint if they can, but the job is not requeued from here: scancel means
# stop (Slurm itself requeues jobs it preempts when the partition's PreemptMode is REQUEUE).
got_term=0 srun_pid="" resend_pid=""
forward() {
    if [[ $1 == TERM ]]; then got_term=1; fi
    log "batch shell got SIG$1: forwarding SIGUSR1 to the training ranks (finish the step, checkpoint, exit 75)"
    [[ -n $srun_pid ]] || return 0
    kill -USR1 "$srun_pid" 2>/dev/null || true
    if [[ -z $resend_pid ]]; then  # again every 30 s, for ranks that were still starting (ignoring it)
        ( while sleep 30; do kill -USR1 "$srun_pid" 2>/dev/null || exit 0; done ) &
        resend_pid=$!
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun "${srun_args[@]}" bash -c "$rank_env" tropd-rank \
    "$TROPD_PYTHON" -m launch.train --recipe "$TROPD_RECIPE" "${overrides[@]}" &
srun_pid=$!
# a trapped signal interrupts `wait`: wait again until srun has really exited, then read its status
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" || true
done
rc=0
wait "$srun_pid" || rc=$?
trap - USR1 TERM
if [[ -n $resend_pid ]]; then kill "$resend_pid" 2>/dev/null || true; fi

case $rc in
    0)
        log "training finished; checkpoints in ${TROPD_CHECKPOINT_DIR}"
        ;;
    75)
        log "preempted: checkpoint saved in ${TROPD_CHECKPOINT_DIR}"
        if ((got_term)); then
            log "not requeued: the job was cancelled, preempted or ran out of time (SIGTERM); resubmit to resume"
        elif [[ $TROPD_REQUEUE == 1 ]]; then
            # (the requeue ends this shell: say it first)
            log "requeueing job ${SLURM_JOB_ID}: it resumes from the checkpoint when it runs again"
            if scontrol requeue "$SLURM_JOB_ID"; then
                exit 0
            fi
            log "scontrol requeue failed: resubmit this job to resume"
        else
            log "TROPD_REQUEUE=${TROPD_REQUEUE}: not requeued; resubmit this job to resume"
        fi
        ;;
    *)
        log "training failed with exit code ${rc}"
        ;;
esac
exit "$rc"
