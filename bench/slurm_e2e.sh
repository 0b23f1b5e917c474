#!/usr/bin/env bash
# A tiny CPU RunAll on a real single-node Slurm whose GPU stages (seed, experts, dense, MoE finetuning,
# evaluations) run as Slurm jobs: starts munged, slurmctld and slurmd with a minimal slurm.conf for this host,
# runs the pipeline with --slurm-enabled, checks that every such stage ran in a job (job ids in stage_log.jsonl,
# each one COMPLETED in Slurm's job completion log), and stops the daemons it started.
#
#   sudo apt-get install -y slurm-wlm munge     # Debian / Ubuntu; run this script as root
#   bash bench/slurm_e2e.sh [work dir]          # ~5 min on 2 CPU cores
#   GPUS_PER_EXPERT=2 bash bench/slurm_e2e.sh    # several devices per expert: each expert's job gets 2 CPUs and
#                                                # trains as 2 gloo ranks through `srun torchrun` (DDP), the path
#                                                # a job with --gres=gpu:2 takes with NCCL
#
# PYTHON (default python3) must import the repository's packages (run from the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
GPUS_PER_EXPERT=${GPUS_PER_EXPERT:-1}
WORK=${1:-$(mktemp -d /tmp/cbtm-slurm-XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
chmod 755 "$WORK"   # the munge user reaches its socket below it
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
mkdir -p "$WORK"/{state,spool,munge}
export SLURM_CONF="$WORK/slurm.conf"
cat > "$SLURM_CONF" <<EOF
ClusterName=cbtm-e2e
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$WORK/jobcomp.log
MinJobAge=3600
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

MUNGE_PID=""
stop() {
    scontrol shutdown >/dev/null 2>&1 || true
    for f in "$WORK/slurmd.pid" "$WORK/slurmctld.pid"; do
        if [ -f "$f" ]; then
            pid=$(cat "$f"); for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill "$pid" 2>/dev/null || true
        fi
    done
    if [ -n "$MUNGE_PID" ]; then kill "$MUNGE_PID" 2>/dev/null || true; fi
}
trap stop EXIT

# munge: its own socket and pid file under $WORK, the system key
chown munge:munge "$WORK/munge"
runuser -u munge -- /usr/sbin/munged --socket="$WORK/munge/munge.socket.2" --pid-file="$WORK/munge/munged.pid" \
    --seed-file="$WORK/munge/munged.seed" --log-file="$WORK/munge/munged.log"
MUNGE_PID=$(cat "$WORK/munge/munged.pid")
echo "AuthInfo=socket=$WORK/munge/munge.socket.2" >> "$SLURM_CONF"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
    sinfo -h -o %T 2>/dev/null | grep -q idle && break; sleep 1
done
sinfo
srun -N1 hostname >/dev/null   # the cluster runs jobs

$PYTHON -c "from pathlib import Path; from tests.pipeline.conftest import write_tiny_corpus; write_tiny_corpus(Path('$WORK/corpus'))"
RUN="$WORK/run"
T0=$(date +%s)
OMP_NUM_THREADS=1 PYTHONPATH=$PWD $PYTHON -m luigi --module pipeline RunAll --local-scheduler --workers 2 \
    --slurm-enabled --slurm-poll-s 1 --slurm-cpus 1 \
    --corpus "$WORK/corpus" --label-field source --run-dir "$RUN" --num-clusters 2 --model-size tiny \
    --vocab-size 400 --seq-len 64 --train-tokens 6144 --seed-fraction 0.5 --batch-tokens 512 --learning-rate 3e-3 \
    --moe-tokens 512 --eval-max-docs 6 --tasks domains --shots 2 --fewshot-seeds 13,21 --fewshot-max-test 6 \
    --device cpu --top-k 2 --embed-sample 1000 --gpus-per-expert "$GPUS_PER_EXPERT" 2>&1 | tail -n 15
echo "RunAll wall time: $(( $(date +%s) - T0 )) s"

# proof: every GPU-type stage names its job; every such job COMPLETED in Slurm's completion log
$PYTHON - "$RUN/stage_log.jsonl" "$WORK/jobcomp.log" "$GPUS_PER_EXPERT" "$RUN" <<'EOF'
import glob, json, re, sys
log = [json.loads(l) for l in open(sys.argv[1])]
comp = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"JobId=(\d+) .*?Name=(\S+) .*?JobState=(\S+)", open(sys.argv[2]).read())}
gpu_stages = ("TrainSeed", "TrainExpert", "TrainDense", "FinetuneMoE", "TrainDenseMoECompute", "EvaluatePerplexity",
              "EvaluateFewShot")
is_job = lambda r: r["stage"] in gpu_stages and not r["output"].endswith("oracle.json")  # oracle: no model runs
jobs = [r for r in log if is_job(r)]
local = [r for r in log if not is_job(r)]
print(f"{'stage':<20} {'slurm job':>9}  {'Slurm: name':<28} {'state':<10} host")
for r in jobs:
    name, state = comp.get(str(r["slurm_job_id"]), ("?", "?"))
    print(f"{r['stage']:<20} {str(r['slurm_job_id']):>9}  {name:<28} {state:<10} {r['host']}")
print(f"{len(jobs)} stages ran as Slurm jobs, {len(local)} light stages ran in the Luigi worker")
experts = [r for r in jobs if r["stage"] == "TrainExpert"]
assert len(experts) == 2, experts
assert all(r["slurm_job_id"] and comp.get(str(r["slurm_job_id"]), ("", ""))[1] == "COMPLETED" for r in jobs), jobs
assert all(r["slurm_job_id"] is None for r in local), local
print("OK: every expert and every other GPU stage ran as a COMPLETED Slurm job")
n = int(sys.argv[3])
if n > 1:  # each expert trained on n devices at once, launched by srun inside its job
    worlds = [json.load(open(f))["world_size"] for f in sorted(glob.glob(f"{sys.argv[4]}/experts-*/cluster_*/training.json"))]
    job_logs = "".join(open(f).read() for f in glob.glob(f"{sys.argv[4]}/slurm-jobs/TrainExpert*.log"))
    print(f"experts' world sizes: {worlds}")
    assert worlds and all(w == n for w in worlds), worlds
    assert "srun --nodes=1 --ntasks=1 --ntasks-per-node=1" in job_logs, job_logs[-2000:]
    print(f"OK: every expert trained as {n} ranks through srun torchrun in its Slurm job")
EOF
test -f "$RUN/report.md"
