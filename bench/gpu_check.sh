#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a lent GPU machine (the `device` tool).
#
# The GPU image has torch, triton, h5py, typer, numpy, pytest; no DALI, no registry, no
# Fashion-MNIST. Prepare here, once per checkout (.gpu/ is ignored by git):
#   mkdir -p .gpu/fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fmnist/
# then one device call (~8 minutes with every stage):
#   run(command="COMMIT=<git rev-parse --short HEAD> bash bench/gpu_check.sh", carry=[".gpu"], timeout_s=560)
# STAGES picks stages (default: all, in this order): test demo ddp uniformity align loader extract
# (ddp trains on the demo's merged store: run it with demo).
# Each stage has its own time limit, so one that hangs cannot eat the others' time.
# Everything lands under $OUT (at most 8 files come back): env.txt, log.txt (all output) and
# one JSON per benchmark. Copy the JSONs worth keeping to bench/results/ (they carry the GPU,
# date and commit) and quote them with the hardware named.
set -u
OUT=${OUT:-bench/scratch/gpu}
STAGES=${STAGES:-test demo ddp uniformity align loader extract}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COOPT_PROGRESS=0
[ -d .gpu/fmnist ] && export COOPT_FASHION_MNIST_DIR="$PWD/.gpu/fmnist"
LOG="$OUT/log.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log its output, time and status
    local name=$1 limit=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0))s" >>"$LOG"
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    echo "commit ${COMMIT:-unknown}"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    nproc
} >"$OUT/env.txt" 2>&1

python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { echo "install failed" >>"$LOG"; exit 1; }

# CUDA paths that CPU CI cannot reach: compiled Triton kernels, the staged/resident loader,
# GPU decoding of compressed targets; then the rest of those suites on the GPU's torch.
# test_device: score --recompute and align on --device cuda against the CPU (kernels on the product path)
stage test 180 python3 -m pytest -q -rs -x tests/test_loader.py tests/test_kernels.py tests/test_codec.py tests/test_device.py
# The whole story with --device cuda (torchvision decoding: no DALI here): bf16 autocast, compile.
stage demo 150 python3 -m coopt_fast demo --out "$OUT/demo-run" --device cuda --limit 8000 --quiet
# The DDP path on one GPU: COOPT_PROCESS_GROUP=always makes a world of one rank init NCCL (after
# set_device), wrap the student in DDP and run the collectives; its summary says data_parallel.
stage ddp 90 bash -c 'COOPT_PROCESS_GROUP=always python3 -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m coopt_fast train "$0/demo-run/run" -o "$0/ddp-student" --device cuda --epochs 1 --max-steps 200 \
    --quiet --json >"$0/ddp_cuda.json"' "$OUT"
# uniformity: on CUDA the default shapes include n = 131,072, l = 512, with TFLOP/s against the H200's 989 bf16 dense
stage uniformity 90 python3 bench/bench_uniformity.py --budget 15 --out "$OUT/uniformity_cuda.json"
stage align 60 python3 bench/bench_align.py --budget 15 --out "$OUT/align_cuda.json"
stage loader 90 python3 bench/bench_loader.py --device cuda --repeats 3 --train-steps 500 --out "$OUT/loader_cuda.json"
stage extract 120 python3 bench/bench_extract.py --only cuda --out "$OUT/extract_cuda.json"
cp "$OUT/demo-run/summary.json" "$OUT/demo_cuda.json" 2>/dev/null
rm -rf "$OUT/demo-run" "$OUT/ddp-student"  # checkpoints and stores: too many files to come back
tail -c 2000 "$LOG"
