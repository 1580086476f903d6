"""`python _deterministic.py SCRIPT ARGS...`: run a script (train.py) with torch.use_deterministic_algorithms on,
so that two runs on a GPU give the same numbers and can be compared bit for bit. On CUDA that makes torch.compile
fall back from atomic-add scatters (the embedding's gradient) and pick kernels without benchmarking, and the
attention's backward deterministic; warn_only: an op with no deterministic kernel warns instead of failing (a
difference it causes shows in the comparison). cuBLAS needs CUBLAS_WORKSPACE_CONFIG, set here unless given."""
import os
import runpy
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402  (after the variable cuBLAS reads)

torch.use_deterministic_algorithms(True, warn_only=True)
script = os.path.abspath(sys.argv[1])
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
