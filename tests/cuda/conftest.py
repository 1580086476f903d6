"""The CUDA tests (tests/cuda/, marker `cuda`): skipped, with the reason, where CUDA is unavailable, unless
CHAT_GPT2_TEST_DEVICE=cpu asks for the dry run on the CPU (tests/cuda/_lib.py). CHAT_GPT2_TEST_REPORT=PATH appends
one JSON line per finished test to PATH as it finishes (tools/gpu_check.sh's summary: a run stopped by its time
budget still reports the tests that finished)."""
import json
import os


CONFIG = []


def pytest_configure(config):
    CONFIG.append(config)
    config.addinivalue_line("markers", "cuda: runs on a GPU (tests/cuda/; CHAT_GPT2_TEST_DEVICE=cpu: on the CPU)")
    # pytest-xdist's (gpu_check.sh runs these with -n, --dist=loadgroup), declared for runs without it
    config.addinivalue_line("markers", "xdist_group(name): the tests of one group run in one xdist worker")


def pytest_runtest_logreport(report):
    path = os.environ.get("CHAT_GPT2_TEST_REPORT")
    if not path or CONFIG and CONFIG[0].pluginmanager.hasplugin("dsession"):
        return  # under pytest-xdist the workers write the lines; the controller, which sees them again, does not
    if report.when != "call" and report.passed:
        return  # setup / teardown that passed: the call's report says how the test went
    line = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
            "seconds": round(report.duration, 2), **dict(report.user_properties)}
    if report.skipped and isinstance(report.longrepr, tuple):
        line["reason"] = report.longrepr[2]
    elif report.failed:
        lines = report.longreprtext.splitlines()
        line["error"] = " | ".join([x for x in lines if x.startswith("E ")][:3] or lines[-1:])[:600]
    with open(path, "a", encoding="utf-8") as f:  # one short line, appended: whole even from several workers
        f.write(json.dumps(line) + "\n")
