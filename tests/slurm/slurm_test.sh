#!/usr/bin/env bash
# A real Slurm test: starts a one-node cluster on localhost (Debian's slurm-wlm and munge), submits the
# sweep script on the tiny model, waits for it with a timeout and checks the HDF5 metrics file; the
# daemons are stopped on exit. Exit status 77 (skipped) when not root or Slurm is not installed
# (launch/install.sh --slurm installs it).
#   tests/slurm/slurm_test.sh <pardit binary> <repository root>
set -euo pipefail
pardit="$1" root="$2"
if [[ $(id -u) -ne 0 ]] || ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v h5ls >/dev/null; then
  echo "SKIP: needs root, slurm-wlm, munge and hdf5-tools (launch/install.sh --slurm)"; exit 77
fi
work="$(mktemp -d /var/spool/pardit-slurm-test.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
host="$(hostname -s)"

# munge: reuse a running daemon, else start one with a fresh key.
if ! pgrep -x munged >/dev/null; then
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [[ ! -s /etc/munge/munge.key ]]; then dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  munged --force
  sleep 1
  pids+=($(pgrep -x munged))  # started here: stopped on exit
fi
pgrep -x munged >/dev/null || { echo "munged did not start"; exit 1; }

mkdir -p "$work/state" "$work/spool" "$work/log"
cat >"$work/slurm.conf" <<CONF
ClusterName=pardit-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$work/slurm.conf"
slurmctld -f "$SLURM_CONF" -D >"$work/log/ctld.out" 2>&1 &
pids+=($!)
sleep 2
slurmd -f "$SLURM_CONF" -D >"$work/log/d.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 30); do
  sinfo -h -o %t 2>/dev/null | grep -qE "idle|mix" && break
  sleep 1
done
sinfo -h -o %t | grep -qE "idle|mix" || { echo "the node did not come up"; cat "$work/log/"*; exit 1; }

# The job: the sweep over 1 and 2 ranks on the tiny model.
"$pardit" synth --preset tiny --text-len 8 --out "$work/model" --quiet
metrics="$work/sweep.h5"
job=$(sbatch --parsable --ntasks=2 --overcommit -o "$work/job.out" \
  --export=ALL,MODEL="$work/model",EMBEDS="$work/model/prompt_embeds.safetensors",METRICS="$metrics",RANKS="1 2",RESOLUTIONS="64x64",STEPS=2,PARDIT_ROOT="$root",PARDIT="$pardit" \
  "$root/slurm/sweep.sbatch")
echo "submitted job $job"
deadline=$((SECONDS + 300))
while squeue -h -j "$job" 2>/dev/null | grep -q .; do
  (( SECONDS < deadline )) || { echo "job $job did not finish in 300 s"; scancel "$job"; cat "$work/job.out"; exit 1; }
  sleep 0.5
done
cat "$work/job.out"
grep -q "sweep done: 4 runs" "$work/job.out" || { echo "the sweep did not complete all 4 runs"; exit 1; }
runs=$(h5ls "$metrics/runs" | wc -l)
[[ "$runs" -eq 4 ]] || { echo "expected 4 runs in $metrics, found $runs"; exit 1; }
for r in $(h5ls "$metrics/runs" | awk '{print $1}'); do
  h5ls "$metrics/runs/$r/step_time" | grep -q "Dataset {[12], 2}" || { echo "run $r: unexpected step_time shape"; h5ls "$metrics/runs/$r/step_time"; exit 1; }
done

# generate.sbatch exactly as its header documents it, with the variables it documents (an environment
# hook among them), from a submit directory of its own.
cat >"$work/env.sh" <<'ENV'
echo "environment hook ran"
export PARDIT_HOOK_MARK=1
ENV
# It runs from an installed prefix, as on a cluster with a shared install (PARDIT_ROOT=<prefix>).
cmake --install "$(dirname "$pardit")" --prefix "$work/prefix" >/dev/null
mkdir -p "$work/submit"
job=$(cd "$work/submit" && PARDIT_ROOT="$work/prefix" PARDIT_ENV_SETUP="$work/env.sh" OUT="$work/gen" \
      HEIGHT=64 WIDTH=64 STEPS=2 FLAGS="--ulysses-degree 2 --max-sequence-length 16" \
      sbatch --parsable --ntasks=2 --export=ALL,MODEL="$work/model",PROMPT="a cat on the moon" \
      "$work/prefix/share/pardit/slurm/generate.sbatch")
echo "submitted job $job (generate.sbatch)"
deadline=$((SECONDS + ${PARDIT_SLURM_TIMEOUT:-300}))
while squeue -h -j "$job" 2>/dev/null | grep -q .; do
  (( SECONDS < deadline )) || { echo "job $job did not finish in ${PARDIT_SLURM_TIMEOUT:-300} s"; scontrol show job "$job";
                                 scancel "$job"; cat "$work/submit/"*.out; tail -20 "$work/log/slurmd.log"; grep -iE "error|job_?2|JobId=2" "$work/log/slurmctld.log" | tail -20; exit 1; }
  sleep 0.5
done
cat "$work/submit/slurm-$job.out"
grep -q "environment hook ran" "$work/submit/slurm-$job.out" || { echo "PARDIT_ENV_SETUP was not sourced"; exit 1; }
grep -q "2 task(s) on 1 node(s)" "$work/submit/slurm-$job.out" || { echo "the job did not get 2 tasks"; exit 1; }
grep -q "pardit generate: .* binary $work/prefix/bin/pardit" "$work/submit/slurm-$job.out" || { echo "the job did not run the installed pardit"; exit 1; }
[[ -s "$work/gen/image.png" ]] || { echo "generate.sbatch wrote no image"; exit 1; }
h5ls "$work/gen/metrics.h5/runs" | grep -q . || { echo "generate.sbatch wrote no metrics run"; exit 1; }

# generate_many.sbatch: a queue as an array of two tasks (--shard auto), each one rank; every line once.
waitFor() {  # job id, seconds
  local deadline=$((SECONDS + $2))
  while squeue -h -j "$1" 2>/dev/null | grep -q .; do
    (( SECONDS < deadline )) || { echo "job $1 did not finish in $2 s"; scontrol show job "$1"; scancel "$1"; return 1; }
    sleep 0.5
  done
}
for i in $(seq 0 5); do echo "prompt number $i"; done >"$work/queue.txt"
job=$(cd "$work/submit" && sbatch --parsable --array=0-1 --ntasks=1 -o "$work/many-%a.out" \
      --export=ALL,MODEL="$work/model",PROMPTS="$work/queue.txt",OUT="$work/many",HEIGHT=64,WIDTH=64,STEPS=2,FLAGS="--max-sequence-length 8",PARDIT_ROOT="$root",PARDIT="$pardit" \
      "$root/slurm/generate_many.sbatch")
echo "submitted array job $job (generate_many.sbatch)"
waitFor "$job" 300 || { cat "$work"/many-*.out; exit 1; }
cat "$work"/many-*.out
lines=$(wc -l <"$work/many/manifest.jsonl")
unique=$(grep -o '"index":[0-9]*' "$work/many/manifest.jsonl" | sort -u | wc -l)
[[ "$lines" -eq 6 && "$unique" -eq 6 ]] || { echo "expected 6 manifest lines for 6 requests, found $lines ($unique indices)"; exit 1; }
[[ $(ls "$work/many/"*.png | wc -l) -eq 6 ]] || { echo "expected 6 PNGs"; ls "$work/many"; exit 1; }

# Stopped by Slurm's signal (as before a time limit), requeued by the script, finished by the same job.
for i in $(seq 0 39); do echo "prompt number $i"; done >"$work/queue40.txt"
job=$(cd "$work/submit" && sbatch --parsable --ntasks=1 -o "$work/requeue.out" \
      --export=ALL,MODEL="$work/model",PROMPTS="$work/queue40.txt",OUT="$work/requeue",HEIGHT=64,WIDTH=64,STEPS=4,FLAGS="--max-sequence-length 8",PARDIT_ROOT="$root",PARDIT="$pardit" \
      "$root/slurm/generate_many.sbatch")
deadline=$((SECONDS + 120))
until [[ -s "$work/requeue/manifest.jsonl" && $(wc -l <"$work/requeue/manifest.jsonl") -ge 2 ]]; do
  (( SECONDS < deadline )) || { echo "job $job made no images"; cat "$work/requeue.out"; scancel "$job"; exit 1; }
  sleep 0.2
done
scancel --signal=USR1 "$job"
# A requeued job waits for its begin time (about two minutes after the requeue, Slurm's rule); once it is
# pending again, start it now, as a cluster with free nodes would shortly.
deadline=$((SECONDS + 120))
until scontrol show job "$job" 2>/dev/null | grep -q "JobState=PENDING"; do
  (( SECONDS < deadline )) || { echo "job $job was not requeued"; scontrol show job "$job"; cat "$work/requeue.out"; exit 1; }
  sleep 0.5
done
scontrol update JobId="$job" StartTime=now
waitFor "$job" 400 || { cat "$work/requeue.out"; exit 1; }
cat "$work/requeue.out"
grep -q "requeueing it" "$work/requeue.out" || { echo "the job was not stopped and requeued"; exit 1; }
grep -q "restart 1" "$work/requeue.out" || { echo "the requeued job did not run again"; exit 1; }
lines=$(wc -l <"$work/requeue/manifest.jsonl")
unique=$(grep -o '"index":[0-9]*' "$work/requeue/manifest.jsonl" | sort -u | wc -l)
[[ "$lines" -eq 40 && "$unique" -eq 40 ]] || { echo "expected 40 manifest lines, found $lines ($unique indices)"; exit 1; }
echo "slurm test passed: the sweep wrote $runs runs; generate.sbatch wrote $work/gen/image.png; generate_many.sbatch made 6 images in 2 array tasks and 40 across a stop and requeue"
