"""bench/gpu_check.sh and the GPU node's rules, rehearsed on the CPU (bench/rehearse.py): a python3
that is a venv made from a venv with the image's packages only, no registry, wheels installed with
pip --no-index --no-deps --target, 64 MiB carried per call, $OUT's return limits, the time limit.
The full check runs here at small sizes and returns exactly the files a GPU run returns."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from helpers import ROOT, require

SCRIPT = ROOT / "bench" / "gpu_check.sh"
REHEARSE = ROOT / "bench" / "rehearse.py"
RETURNED = {"gpu_check.json", "step.json", "loader.json", "logs.tar.gz"}  # what a GPU run returns


def rehearse(state, *args: str, timeout: int = 120) -> tuple[int, dict]:
    """(exit status, report) of one rehearsed call; ``args`` are rehearse.py's, the command last. The
    report holds the output's tail (``output_tail``)."""
    r = subprocess.run([sys.executable, str(REHEARSE), "--state", str(state), "--timeout", str(timeout), *args],
                       capture_output=True, text=True, timeout=timeout + 120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return r.returncode, json.loads((state / "report.json").read_text())


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One rehearsal node for the module (its image venv is built once); tests start it --cold."""
    return tmp_path_factory.mktemp("node")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """The carried wheel folder, built as for the node but for this Python (pip's cache makes a
    second build cheap)."""
    dest = tmp_path_factory.mktemp("wheels")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_wheels.py"), "--python-version", "local",
                        "-d", str(dest)], capture_output=True, text=True, timeout=600)
    require("the package index (pip download)", r.returncode == 0, r.stderr.strip()[-300:])
    return dest


def test_script_is_valid_bash_and_refuses_bad_input_in_one_line():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    r = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    for word in ("tests", "step", "loader", "train", "--wheels", "--dali", "--cpu", "--budget", "$OUT"):
        assert word in r.stdout
    assert "set -uo" not in r.stdout and r.stdout.rstrip().endswith("says which).")  # the comment block only
    for bad, why in ((["--frobnicate"], "unknown argument"), (["--stages", "tests,warp"], "unknown stage 'warp'"),
                     (["--budget", "7m"], "expected whole seconds"), (["--wheels", "/nonexistent"], "no such folder")):
        r = subprocess.run(["bash", str(SCRIPT), *bad], capture_output=True, text=True)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, bad


def test_the_node_python_has_the_image_and_nothing_else(node):
    """The facts the check is built on: a venv made from the node's python3 does not see its torch;
    hdf5plugin is not in the image; pip reaches no index."""
    cmd = ("python3 -m venv --without-pip --system-site-packages $TMPDIR/v && ($TMPDIR/v/bin/python -c 'import torch' "
           "|| echo VENV-NO-TORCH); python3 -c 'import torch, h5py, numpy, yaml, pytest; print(\"IMAGE-OK\")'; "
           "python3 -c 'import hdf5plugin' || echo NO-HDF5PLUGIN; "
           "python3 -m pip download -q -d $TMPDIR/x numcodecs || echo NO-INDEX")
    code, report = rehearse(node, "--cold", "--", cmd)
    for marker in ("VENV-NO-TORCH", "IMAGE-OK", "NO-HDF5PLUGIN", "NO-INDEX"):
        assert marker in report["output_tail"], report["output_tail"]


def test_without_the_wheels_the_check_stops_at_once_with_one_line(node):
    code, report = rehearse(node, "--cold", "--", "bash", "bench/gpu_check.sh", "--cpu")
    tail = report["output_tail"]
    assert report["rc"] == 2 and "No module named 'hdf5plugin'" in tail and "bench/gpu_wheels.py" in tail
    assert set(report["files"]) == {"gpu_check.json", "logs.tar.gz"}  # why, in the files that come back
    result = json.loads((node / "back" / "gpu_check.json").read_text())
    preflight = result["stages"]["preflight"]
    assert preflight["status"] == "failed" and "hdf5plugin" in preflight["reason"]


def test_more_than_64_mib_is_refused_before_anything_runs(tmp_path, node):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(63 * 2**20)  # + the repository (~2 MiB): over 64 MiB
    code, report = rehearse(node, "--carry", f".gpu-wheels={big}", "--", "touch $OUT/ran")
    assert code == 3 and "larger than 64 MiB" in report["refused"] and not (node / "out" / "ran").exists()


def test_only_what_the_node_returns_comes_back(node):
    cmd = ("cd $OUT && for i in 1 2 3 4 5 6 7 8 9; do echo $i > f$i.json; done && truncate -s 17M big.bin && "
           "mkdir -p a/b/c && echo x > a/b/ok.txt && echo x > a/b/c/deep.txt && echo x > 'odd name.txt' && "
           "ln -s f1.json link.json")
    code, report = rehearse(node, "--", cmd)
    left = "\n".join(report["files_left_out"])
    assert code == 1 and report["rc"] == 0 and len(report["files"]) == 8
    for why in ("big.bin (over 16 MiB)", "a/b/c/deep.txt (a folder too deep)", "odd name.txt (a name with odd",
                "link.json (a link)", "(over 8 files)"):
        assert why in left, left
    assert sorted(p.name for p in (node / "back").rglob("*") if p.is_file()) == sorted(
        os.path.basename(f) for f in report["files"])


def test_the_time_limit_kills_the_command_and_what_it_wrote_comes_back(node):
    code, report = rehearse(node, "--timeout", "2", "--", "echo '{}' > $OUT/partial.json; sleep 60")
    assert report["timed_out"] and report["rc"] == 124 and report["files"] == ["partial.json"] and code == 1


@pytest.mark.slow
def test_rehearsal_returns_what_a_gpu_run_returns(wheels, node):
    code, report = rehearse(node, "--cold", "--carry", f".gpu-wheels={wheels}", "--", "bash",
                            "bench/gpu_check.sh", "--cpu", timeout=420)
    assert code == 0, report
    assert set(report["files"]) == RETURNED and not report["files_left_out"] and report["travelled_mib"] <= 64
    back = node / "back"
    result = json.loads((back / "gpu_check.json").read_text())
    assert result["complete"] and result["machine"]["executable"].startswith(str(node / "image"))
    assert result["machine"]["numcodecs"] and result["machine"]["dali"] is None  # from the wheels; no DALI
    stages = result["stages"]
    assert [s for s, r in stages.items() if r["status"] == "ok"] == ["tests", "step", "data", "loader", "train"]
    assert stages["tests"]["junit"]["tests"] >= 5 and stages["tests"]["junit"]["not_passed"] == []
    step = stages["step"]["rows"][0]
    assert step["preset"] == "badblock" and step["mfu_measured"] > 0 and step["peak_measured_tflops"] > 0
    loader = stages["loader"]["rows"]
    assert [r["backend"] for r in loader] == ["torch"]  # DALI is absent from the node's image
    assert loader[0]["step_source"].startswith("bench/step.py badblock fp32") and loader[0]["ratio"] > 0
    train = stages["train"]  # stopped by USR2 with 2 loader workers: checkpoint, exit 75
    assert train["rc"] == 75 and train["checkpoint"].startswith("step-") and train["samples_per_s"] > 0
    assert result["figures"]["train_samples_per_s"] == train["samples_per_s"]
    with tarfile.open(back / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"tests.xml", "step.log", "loader.log", "train.log", "metrics.jsonl", "stages.jsonl"} <= names
    assert "gpu_check: train rc=75" in report["output_tail"] and "train_samples_per_s" in report["output_tail"]


def test_a_term_from_the_node_limit_stops_the_stage_and_the_results_are_still_written(tmp_path):
    """The node's limit sends TERM to the whole process group: the running stage is recorded as
    stopped, the JSON and the log tarball are written before the KILL that follows."""
    (tmp_path / "none").mkdir()  # no wheels: this Python has hpc's dependencies
    p = subprocess.Popen(["bash", str(SCRIPT), "--cpu", "--stages", "tests", "-o", str(tmp_path / "o"),
                          "--wheels", str(tmp_path / "none"), "--site", str(tmp_path / "site")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)})
    log = tmp_path / "hpc-gpu-check" / "logs" / "tests.log"
    deadline = time.monotonic() + 120
    while not log.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log.exists(), p.communicate()
    os.killpg(p.pid, signal.SIGTERM)  # as `timeout` does at the node's limit
    out, err = p.communicate(timeout=60)
    result = json.loads((tmp_path / "o" / "gpu_check.json").read_text())
    assert p.returncode == 1 and "stopped by a signal" in err and (tmp_path / "o" / "logs.tar.gz").is_file()
    assert result["complete"] and result["stages"]["tests"]["status"] == "stopped"


def test_a_budget_too_small_for_a_stage_skips_it(tmp_path):
    (tmp_path / "none").mkdir()  # no wheels: this Python has hpc's dependencies
    r = subprocess.run(["bash", str(SCRIPT), "--cpu", "--budget", "30", "--stages", "step", "-o", str(tmp_path / "o"),
                        "--wheels", str(tmp_path / "none"), "--site", str(tmp_path / "site")],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)})
    result = json.loads((tmp_path / "o" / "gpu_check.json").read_text())
    assert r.returncode == 1 and result["stages"]["step"]["status"] == "skipped", r.stdout + r.stderr


def test_the_listmode_stage_returns_the_histogram_against_cat(tmp_path):
    """The opt-in second call for issue 25 (``--stages listmode``), at its CPU size: a list-mode file
    histogrammed and checked against the generator, each kernel's ratio to `cat` in the JSON."""
    (tmp_path / "none").mkdir()  # no wheels: this Python has hpc's dependencies
    r = subprocess.run(["bash", str(SCRIPT), "--cpu", "--stages", "listmode", "-o", str(tmp_path / "o"),
                        "--wheels", str(tmp_path / "none"), "--site", str(tmp_path / "site")],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "o" / "gpu_check.json").read_text())
    stage = result["stages"]["listmode"]
    assert stage["status"] == "ok" and set(stage["x_cat"]) >= {"warm numpy:1", "cold numpy:1", "warm cpu:1"}
    assert all(v > 0 for v in stage["x_cat"].values())
    assert result["figures"]["listmode_warm_numpy_x_cat"] == stage["x_cat"]["warm numpy:1"]
    compiled = f"warm numba:{len(os.sched_getaffinity(0))}"  # numba imports here: the kernel on every core (nproc)
    assert result["figures"]["listmode_warm_numba_x_cat"] == stage["x_cat"][compiled]
    assert "x cat" in r.stdout  # the printed table names the ratios
    assert not list((tmp_path / "hpc-gpu-check").glob("bench_listmode*"))  # the 50 MB file is removed


def test_dali_parts_travel_in_warm_calls_and_reassemble(tmp_path, wheels, node):
    """The part mechanism on real wheels (this Python's hdf5plugin + numcodecs, 20 MiB parts):
    a part per call, a cold node forgets, --complete waits for every part, a damaged part is refused,
    the reassembled wheels install with --no-index."""
    parts, carry, node = tmp_path / "parts", tmp_path / "carry", node
    dp = [sys.executable, str(ROOT / "bench" / "dali_parts.py")]
    to_node = ("--carry", f".dali-carry={carry}")
    subprocess.run([*dp, "split", "--wheels", str(wheels), "--parts", str(parts), "--part-mib", "20"], check=True)
    n = len(json.loads((parts / "manifest.json").read_text())["parts"])
    assert n == 3
    receive = "python3 bench/dali_parts.py receive --complete"
    install = (" && python3 -m pip install -q --no-index --no-deps --target $TMPDIR/s .dali/wheels/*.whl"
               " && PYTHONPATH=$TMPDIR/s python3 -c 'import hdf5plugin, numcodecs; print(\"DALI-PARTS-OK\")'")
    for k in range(n):
        subprocess.run([*dp, "stage", str(k), "--parts", str(parts), "--carry", str(carry)], check=True)
        if k == 1:  # a cold node between two calls: part 0 is gone
            code, report = rehearse(node, "--cold", *to_node, "--", receive)
            assert report["rc"] == 3 and "missing: part-000, part-002" in report["output_tail"]
            subprocess.run([*dp, "stage", "0", "--parts", str(parts), "--carry", str(carry)], check=True)
            rehearse(node, *to_node, "--", receive)
            subprocess.run([*dp, "stage", "1", "--parts", str(parts), "--carry", str(carry)], check=True)
        cold = ("--cold",) if k == 0 else ()
        code, report = rehearse(node, *cold, *to_node, "--", receive + (install if k == n - 1 else ""))
        assert report["travelled_mib"] <= 64 and report["rc"] == (0 if k == n - 1 else 3), report["output_tail"]
    assert "DALI-PARTS-OK" in report["output_tail"]
    with open(carry / "part-002", "r+b") as f:  # damaged in transit
        f.write(b"\0" * 16)
    code, report = rehearse(node, *to_node, "--", receive)
    assert report["rc"] == 2 and "does not match the manifest" in report["output_tail"]


def test_a_failing_loader_row_keeps_the_others(node, wheels):
    """On the node DALI is absent: its row records the import error, the torch row after it still
    runs, and the JSON holds both (it is rewritten after every row)."""
    cmd = ("python3 -m pip install -q --no-index --no-deps --target $TMPDIR/s .gpu-wheels/*.whl && "
           "PYTHONPATH=$TMPDIR/s python3 bench/loader.py --device cpu --size 24x32 --studies 2 --slices 16 "
           "--epochs 1 --batch 4 --workers 0 --backends dali,torch --json $OUT/loader.json")
    code, report = rehearse(node, "--cold", "--carry", f".gpu-wheels={wheels}", "--", cmd)
    rows = json.loads((node / "back" / "loader.json").read_text())
    assert report["rc"] == 1 and [r["backend"] for r in rows] == ["dali", "torch"]
    assert "nvidia" in rows[0]["error"] and rows[1]["slices_per_s"] > 0 and "error" not in rows[1]


def test_cudnn_finding_no_engine_counts_as_out_of_memory():
    """Near the memory limit cuDNN raises a plain RuntimeError, not torch.OutOfMemoryError: the
    batch search must read both as 'does not fit', and nothing else."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    step = sys.modules["bench_step"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(step)  # the script as a module, bench/ kept off sys.path
    out_of_memory = step.out_of_memory

    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert out_of_memory(RuntimeError("GET was unable to find an engine to execute this computation"))
    assert not out_of_memory(RuntimeError("Given groups=1, weight of size [64, 5, 3, 3], expected input"))
