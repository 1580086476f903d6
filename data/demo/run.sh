#!/usr/bin/env bash
# The main job, from a fresh checkout: install, make the demo data, train, score, and talk to the model.
#   bash data/demo/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -r requirements.txt
PY=.venv/bin/python
$PY data/demo/generate.py                                   # data/demo/train.jsonl + heldout.jsonl
$PY prepare.py data/demo/train.jsonl --out_dir=data/demo    # -> data/demo/{train,val}.bin, masks, meta.json
$PY train.py config/demo.py                                 # -> out-demo/finetuned_YYYYMMDD_HHMMSS.pt
$PY eval.py --out_dir=out-demo --data=data/demo/heldout.jsonl --out=out-demo/heldout_replies.jsonl
$PY sample.py --out_dir=out-demo --temperature=0 --prompt "What is the capital of France?"
