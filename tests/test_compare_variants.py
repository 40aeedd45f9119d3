"""benchmarks/compare_variants.py: a finished run is read back, not retrained, with --resume;
without it every run starts afresh."""

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_variants.py"


def compare(out, *flags):
    command = [sys.executable, str(SCRIPT), "--preset", "test", "--steps", "2", "--models", "window", "--seeds", "0",
               "--out", str(out), *flags, "--", "--sample-len", "0", "--validate-every", "0"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads((out / "results.json").read_text())["runs"]


def test_resume_reads_finished_runs_back(tmp_path):
    first = compare(tmp_path)
    metrics = tmp_path / "window-seed0" / "metrics.jsonl"
    records = metrics.read_text()
    assert first[0]["model"] == "window" and first[0]["seed"] == 0

    resumed = compare(tmp_path, "--resume")
    assert metrics.read_text() == records  # no step was trained again
    assert resumed[0]["valid_bpb"] == first[0]["valid_bpb"]
    assert "resuming" in (tmp_path / "window-seed0.log").read_text()

    compare(tmp_path)  # without --resume: a fresh run, its metrics rewritten from step 1
    assert "resuming" not in (tmp_path / "window-seed0.log").read_text()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_configurations_run_every_model_with_the_flags_that_apply(tmp_path):
    command = [sys.executable, str(SCRIPT), "--preset", "test", "--steps", "2", "--models", "mac,window", "--seeds", "0",
               "--out", str(tmp_path), "--config", "as is=", "--config", "chunk 2=--segment-len 16 --chunk-size 2",
               "--", "--sample-len", "0", "--validate-every", "0"]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    runs = {(r["model"], r["config"]): r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert set(runs) == {(m, c) for m in ("mac", "window") for c in ("as is", "chunk 2")}
    arch = torch.load(tmp_path / "mac-chunk_2-seed0" / "checkpoint.pt", weights_only=True)["arch"]
    assert (arch["segment_len"], arch["neural_memory_kwargs"]["chunk_size"]) == (16, 2)
    window = torch.load(tmp_path / "window-chunk_2-seed0" / "checkpoint.pt", weights_only=True)["arch"]
    assert window["segment_len"] == 16  # the segment applies to the baseline, the memory's chunk does not
    assert runs["mac", "chunk 2"]["valid_bpb"] != runs["mac", "as is"]["valid_bpb"]
    assert "chunk 2" in result.stdout and "training minutes" in result.stdout
