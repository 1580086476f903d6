#!/usr/bin/env bash
# The whole GPU check in one command (docs/gpu.md): the CUDA tests (tests/cuda/), then the training and generation
# benchmarks (tools/gpu_bench.py), each section under its own time budget. Each section's log and the JSON summary
# ($OUT/summary.json: every section's status and seconds, every test's outcome, the benchmarks' figures) are
# written as each section finishes, so a budget that runs out still returns the finished parts.
#
#   OUT=/tmp/gpu-check bash tools/gpu_check.sh                       # on the GPU machine (under 5 minutes)
#   OUT=/tmp/gpu-check bash tools/gpu_check.sh --device=cpu --tiny   # the dry run on a CPU, tiny shapes
#
# Options: --device=cuda|cpu, --tiny (small shapes), --sections=setup,tests,train,generate (default: all),
# --budget_<section>=SECONDS. Environment: OUT (default /tmp/gpu-check), PYTHON (default python3).
# Offline: wheels in .gpu_wheels/ are installed first (into /tmp/gpu_site, on PYTHONPATH); the tokenizer comes
# from .gpu_cache/tiktoken, copied there from ../shared/tiktoken_cache when that exists (prepare it here, carry it).
set -u
set -m  # each section in its own process group: a budget that runs out stops its subprocesses too
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEVICE=cuda TINY=0 SECTIONS=setup,tests,train,generate
declare -A BUDGET=([setup]=20 [tests]=150 [train]=120 [generate]=40) GIVEN=()  # 330 s in all
for arg in "$@"; do
    case "$arg" in
        --device=*) DEVICE=${arg#--device=} ;;
        --tiny) TINY=1 ;;
        --sections=*) SECTIONS=${arg#--sections=} ;;
        --budget_*=*) key=${arg#--budget_}; GIVEN[${key%%=*}]=${key#*=} ;;
        *) echo "error: unknown option $arg (see the top of $0)" >&2; exit 2 ;;
    esac
done
[ "$DEVICE" = cpu ] && BUDGET=([setup]=60 [tests]=420 [train]=150 [generate]=90)  # a dry run on a shared CPU
for key in "${!GIVEN[@]}"; do BUDGET[$key]=${GIVEN[$key]}; done
OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/gpu-check-work.XXXXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# torch.compile's cache, shared by all the processes and kept for a re-run on the same machine (much less compiling)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/chat_gpt2_inductor}
[ "$DEVICE" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# summary.json: {"device", "tiny", "sections": {name: {status, rc, seconds, budget}}, "tests": [...],
# "bench": {...}}, merged from the section results in $WORK after each section
summarize() {
    "$PY" - "$OUT/summary.json" "$WORK" "$DEVICE" "$TINY" <<'EOF'
import json, os, sys
path, work, device, tiny = sys.argv[1:]
summary = {"device": device, "tiny": tiny == "1", "sections": {}, "tests": [], "bench": {}}
for name in ("setup", "tests", "train", "generate"):
    status = os.path.join(work, f"{name}.status.json")
    if os.path.exists(status):
        summary["sections"][name] = json.load(open(status))
tests = os.path.join(work, "tests.jsonl")
if os.path.exists(tests):
    summary["tests"] = [json.loads(line) for line in open(tests) if line.strip()]
    finished = {t["test"] for t in summary["tests"]}
    collected = os.path.join(work, "tests.collected")
    for test in (open(collected).read().splitlines() if os.path.exists(collected) else []):
        if test not in finished:  # still running, or never started, when the section's budget ran out
            summary["tests"].append({"test": test, "outcome": "unfinished"})
    counts = {}
    for t in summary["tests"]:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    summary["test_counts"] = counts
for name in ("train", "generate"):
    bench = os.path.join(work, f"bench_{name}.json")
    if os.path.exists(bench):
        summary["bench"][name] = json.load(open(bench)).get(name)
setup = os.path.join(work, "setup.json")
if os.path.exists(setup):
    summary["setup"] = json.load(open(setup))
with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=1)
os.replace(path + ".tmp", path)
EOF
}

# run_section NAME COMMAND...: COMMAND under the section's budget, its output in $OUT/NAME.log
run_section() {
    local name=$1 budget=${BUDGET[$1]} start rc status
    shift
    case ",$SECTIONS," in *",$name,"*) ;; *)
        echo "{\"status\": \"not run (--sections=$SECTIONS)\"}" >"$WORK/$name.status.json"; summarize
        echo "== $name: not run (--sections=$SECTIONS)"; return 0 ;;
    esac
    echo "== $name (budget ${budget}s) ..."
    start=$(date +%s)
    "$@" >"$OUT/$name.log" 2>&1 &
    local pid=$!
    (sleep "$budget"; touch "$WORK/$name.timeout"; kill -TERM -- -"$pid" 2>/dev/null; sleep 5
     kill -KILL -- -"$pid" 2>/dev/null) &
    local watchdog=$!
    wait "$pid" 2>/dev/null; rc=$?
    kill -- -"$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null
    if [ -e "$WORK/$name.timeout" ]; then status=timeout; elif [ $rc = 0 ]; then status=passed; else status=failed; fi
    echo "{\"status\": \"$status\", \"rc\": $rc, \"seconds\": $(($(date +%s) - start)), \"budget\": $budget}" \
        >"$WORK/$name.status.json"
    summarize
    echo "== $name: $status (rc $rc, $(($(date +%s) - start))s of ${budget}s); log: $OUT/$name.log"
    [ $status = passed ] || tail -n 25 "$OUT/$name.log"
}

setup() {
    set -e
    echo "device $DEVICE, tiny $TINY, python $PY ($("$PY" --version 2>&1)), repo $REPO, $(nproc) CPUs"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    if compgen -G ".gpu_wheels/*.whl" >/dev/null; then
        echo "installing $(ls .gpu_wheels/*.whl | wc -l) wheel(s) from .gpu_wheels/ into /tmp/gpu_site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site \
            .gpu_wheels/*.whl
    else
        echo "no wheels in .gpu_wheels/: using the installed packages only"
    fi
    "$PY" - "$DEVICE" "$WORK/setup.json" <<'EOF'
import importlib, importlib.metadata as md, json, os, sys
device, path = sys.argv[1:]
info = {"packages": {}, "missing": []}
for name in ("torch", "numpy", "tiktoken", "huggingface_hub", "safetensors", "matplotlib", "pytest", "transformers",
             "peft", "xdist"):
    try:
        importlib.import_module(name)
        info["packages"][name] = md.version("pytest-xdist" if name == "xdist" else name)
    except Exception as e:  # noqa: BLE001 (any import failure is reported, not hidden)
        info["missing"].append(f"{name}: {type(e).__name__}: {e}")
import torch
info["cuda_available"] = torch.cuda.is_available()
if info["cuda_available"]:
    info["gpu"] = torch.cuda.get_device_name()
    info["bf16"] = torch.cuda.is_bf16_supported()
info["tiktoken_cache"] = os.environ.get("TIKTOKEN_CACHE_DIR")
print(json.dumps(info, indent=1))
json.dump(info, open(path, "w"))
required = {"torch", "numpy", "tiktoken", "huggingface_hub", "safetensors", "matplotlib", "pytest"}
if any(m.split(":")[0] in required for m in info["missing"]):
    sys.exit("error: a required package is missing (above): put its wheel in .gpu_wheels/ (docs/gpu.md)")
if device.startswith("cuda") and not info["cuda_available"]:
    sys.exit("error: --device=cuda but torch.cuda.is_available() is False")
from chat_gpt2 import chat
chat.get_encoder().encode("tokenizer check")  # offline: needs the cache
print("tokenizer: ok")
EOF
}

# the tokenizer cache: .gpu_cache/tiktoken, filled from ../shared/tiktoken_cache where that exists
if [ -d ../shared/tiktoken_cache ] && [ ! -d .gpu_cache/tiktoken ]; then
    mkdir -p .gpu_cache && cp -r ../shared/tiktoken_cache .gpu_cache/tiktoken && chmod -R u+w .gpu_cache
fi
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$REPO/.gpu_cache/tiktoken}
[ -d /tmp/gpu_site ] || mkdir -p /tmp/gpu_site
export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}

run_section setup setup
if ! grep -q '"status": "passed"\|"status": "not run' "$WORK/setup.status.json"; then
    echo "setup failed: nothing else runs"; cat "$OUT/summary.json"; exit 1
fi

tests() {
    local args=(-q -rA -p no:cacheprovider)
    if [ "$DEVICE" != cpu ] && "$PY" -c "import xdist" 2>/dev/null; then
        args+=(-n 6 --dist=loadgroup)  # compiles in parallel: 16 CPUs, and a GPU with room for all the runs
    fi
    export CHAT_GPT2_TEST_DEVICE=$DEVICE CHAT_GPT2_TEST_TINY=$TINY CHAT_GPT2_TEST_REPORT=$WORK/tests.jsonl
    "$PY" -m pytest tests/cuda --collect-only -q -p no:cacheprovider | grep '::' >"$WORK/tests.collected"
    echo "$(wc -l <"$WORK/tests.collected") tests: pytest tests/cuda ${args[*]}"
    "$PY" -m pytest tests/cuda "${args[@]}"
}
run_section tests tests

BENCH_ARGS=(--device="$DEVICE")
[ "$TINY" = 1 ] && BENCH_ARGS+=(--preset=tiny --profile=true)
run_section train "$PY" tools/gpu_bench.py --section=train "${BENCH_ARGS[@]}" --json="$WORK/bench_train.json"
run_section generate "$PY" tools/gpu_bench.py --section=generate "${BENCH_ARGS[@]}" \
    --json="$WORK/bench_generate.json"

"$PY" - "$OUT/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print("== summary:", json.dumps({k: v["status"] for k, v in s["sections"].items()}), "tests:", s.get("test_counts"))
for t in s["tests"]:
    if t["outcome"] != "passed":
        print(f"  {t['outcome'].upper()}: {t['test']}: {t.get('reason') or t.get('error', '')}")
for name, b in s["bench"].items():
    if b:
        print(f"  {name}: targets {b.get('targets')}")
        for row in b.get("rows", []):
            print("   ", json.dumps(row))
bad = [k for k, v in s["sections"].items() if v["status"] not in ("passed",) and not v["status"].startswith("not run")]
counts = s.get("test_counts", {})
sys.exit(1 if bad or counts.get("failed") or counts.get("unfinished") else 0)
EOF
