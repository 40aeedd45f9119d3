"""train_mac.py, the training program: runs on the offline corpus with the minuscule `test`
preset (a few steps, seconds), in-process where possible and as a real command where it matters
(the command line, torchrun)."""

import gzip
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
import types
import zipfile
from pathlib import Path
from unittest import mock

import pytest
import torch

from titans_pytorch import MemoryAsContextTransformer
from titans_pytorch.cuda_graphs import rerun_eagerly


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train_mac.py"
_spec = importlib.util.spec_from_file_location("train_mac", SCRIPT)
train_mac = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_mac)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
if sys.platform == "linux":
    ENV.setdefault("GLOO_SOCKET_IFNAME", "lo")  # torchrun --standalone talks over the loopback interface


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test runs in an empty directory (no data/enwik8.gz: the offline corpus) and leaves
    the global RNG as it found it."""
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng(devices=[]):
        yield


def train(out, *flags):
    """main() in-process with the test preset; returns its exit code."""
    return train_mac.main(["--preset", "test", "--out", str(out), *flags])


def metrics(out):
    return train_mac.read_metrics(Path(out) / "metrics.jsonl")


def steps_of(records, key):
    return {r["step"]: r[key] for r in records if key in r}


def checkpoint(out):
    return torch.load(Path(out) / "checkpoint.pt", map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- the command


def test_command_trains_validates_samples_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "test", "--out", str(out), "--sample-every", "4", "--eval-test"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fallback = [line for line in lines if "offline corpus" in line and "enwik8 not found" in line]
    assert fallback == ["enwik8 not found at data/enwik8.gz (--download fetches it): training on the "
                        "offline corpus (Python standard library source)"]
    assert any("sample at step 4" in line for line in lines) and any("sample at step 8" in line for line in lines)
    assert lines[-1].startswith("done: step 8, validation ") and ", test " in lines[-1]

    records = metrics(out)
    train_bpb = steps_of(records, "train_bpb")
    assert sorted(train_bpb) == list(range(1, 9))
    assert sorted(steps_of(records, "valid_bpb")) == [4, 8]
    assert sorted(steps_of(records, "test_bpb")) == [8]
    assert all(0 < value < 10 for value in train_bpb.values())

    saved = checkpoint(out)
    assert saved["step"] == 8 and saved["world_size"] == 1 and saved["config"]["preset"] == "test"
    assert {"model", "optimizer", "scheduler", "rng", "arch", "data"} <= set(saved)
    model = train_mac.build_model("mac", saved["arch"])
    model.load_state_dict(saved["model"])
    assert not list(tmp_path.glob("run/*.tmp"))
    assert "model/" in lines[-1]

    # the final model, exported beside the checkpoint, is the checkpoint's model
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors"]
    exported = MemoryAsContextTransformer.from_pretrained(out / "model")
    ids = torch.randint(0, 256, (2, 40))
    assert torch.equal(exported(ids), model.eval()(ids))


FAULTS_PER_40MB = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import train_mac
applied = train_mac.keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(10_000_000)  # warm-up
start = faults()
for _ in range(5):
    torch.ones(10_000_000)  # 40 MB, above glibc's 32 MiB limit for keeping a freed block
print(applied, (faults() - start) / 5)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_cpu_training_keeps_freed_memory_unless_the_user_chose():
    import resource  # Unix only

    def run(env):
        code = FAULTS_PER_40MB.format(root=str(ROOT))
        applied, faults = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                         check=True, timeout=60).stdout.split()
        return applied == "True", float(faults)

    env = {name: value for name, value in ENV.items() if name not in train_mac.MALLOC_VARIABLES}
    pages = 40e6 / resource.getpagesize()
    applied, faults = run(env)
    assert applied and faults < 0.5 * pages  # a block freed and allocated again is not faulted in again
    applied, faults = run({**env, "MALLOC_TRIM_THRESHOLD_": str(128 << 10)})  # the user's choice stands
    assert not applied and faults > 0.9 * pages


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--steps", "0"], "--steps"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--batch-size", "two"], "--batch-size"),
        (["--grad-accum", "0"], "--grad-accum"),
        (["--preset", "huge"], "--preset"),
        (["--model", "gpt"], "--model"),
        (["--dtype", "float16"], "--dtype"),
        (["--clip", "-0.5"], "--clip"),
        (["--memory-layers", "0"], "--memory-layers"),
        (["--segment-len", "0"], "--segment-len"),
    ],
)
def test_bad_flags_are_argparse_errors_naming_the_flag(tmp_path, capsys, flags, flag):
    with pytest.raises(SystemExit) as error:
        train(tmp_path / "run", *flags)
    assert error.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: CUDA is not available"):
        train(tmp_path / "run", "--device", "cuda")


def test_flags_override_the_checkpoint_which_overrides_the_preset():
    parse = train_mac.build_parser().parse_args
    gpu = train_mac.resolve_config(parse([]), None, "cuda")
    assert (gpu.preset, gpu.model, gpu.batch_size, gpu.grad_accum, gpu.seq_len) == ("base", "mac", 16, 1, 512)
    cpu = train_mac.resolve_config(parse([]), None, "cpu")  # the same bytes a step, in smaller micro-batches
    assert (cpu.batch_size, cpu.grad_accum) == (2, 8)
    tiny = train_mac.resolve_config(parse(["--preset", "tiny", "--steps", "50"]), None, "cpu")
    assert (tiny.steps, tiny.batch_size, tiny.grad_accum, tiny.threads) == (50, 16, 1, 1)
    saved = vars(tiny)
    resumed = train_mac.resolve_config(parse(["--steps", "80", "--sample-len", "0"]), saved, "cuda")
    assert (resumed.preset, resumed.steps, resumed.batch_size, resumed.sample_len) == ("tiny", 80, 16, 0)


# ----------------------------------------------------------------------------- generation


def expected_continuation(out, prompt: bytes, length, seed, **sample_kwargs):
    """What --generate should print: the prompt, then model.sample's continuation as text."""
    saved = checkpoint(out)
    model = train_mac.build_model(saved["config"]["model"], saved["arch"])
    model.load_state_dict(saved["model"])
    torch.manual_seed(seed)
    ids = torch.tensor(list(prompt))[None]
    continuation = model.sample(ids, ids.shape[1] + length, **sample_kwargs)
    return train_mac.readable(torch.cat((ids, continuation), dim=1)[0]) + "\n"


def test_generate_prints_the_continuation_of_a_trained_run(tmp_path):
    out = tmp_path / "run"
    assert train(out) == 0
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--generate", "def ", "--sample-len", "32",
                             "--seed", "3"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_continuation(out, b"def ", 32, 3, temperature=0.8, filter_kwargs={"min_p": 0.1})
    assert len(result.stdout.encode()) > len("def \n")


def test_generate_takes_its_flags_and_reads_an_exported_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--model", "lmm", "--steps", "2") == 0
    capsys.readouterr()
    flags = ["--generate", "é\t", "--sample-len", "12", "--seed", "5", "--temperature", "1.5", "--top-k", "4"]
    assert train_mac.main(["--out", str(out), *flags]) == 0
    expected = expected_continuation(out, "é\t".encode(), 12, 5, temperature=1.5, filter_fn="top_k", filter_kwargs={"k": 4})
    assert capsys.readouterr().out == expected
    assert train_mac.main(["--out", str(out / "model"), *flags]) == 0  # the export gives the same text
    assert capsys.readouterr().out == expected
    assert train_mac.main(["--out", str(out), "--generate", "x", "--sample-len", "0"]) == 0
    assert capsys.readouterr().out == "x\n"


def test_streamed_text_shows_bytes_that_are_not_utf8():
    written = []
    stream = train_mac.TextStream(types.SimpleNamespace(write=written.append, flush=lambda: None))
    for byte in "aé€".encode() + b"\xff\x07\n" + "€".encode()[:2]:
        stream.write(bytes([byte]))
    stream.write(b"", final=True)
    assert "".join(written) == "aé€\N{REPLACEMENT CHARACTER}\N{REPLACEMENT CHARACTER}\n\N{REPLACEMENT CHARACTER}"
    assert written[1:3] == ["", "é"]  # a character is written once complete


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--generate", "x", "--resume"], "--generate loads the model in --out and trains nothing: --resume does not apply"),
        (["--generate", "x", "--overwrite", "--lr", "0.1"], "--lr, --overwrite do not apply"),
        (["--generate", ""], "--generate: the prompt is empty"),
        (["--temperature", "0.5"], "--temperature applies only with --generate"),
        (["--generate", "x", "--top-k", "3", "--top-p", "0.5"], "not allowed with argument"),
        (["--generate", "x", "--min-p", "1.5"], "argument --min-p: must be a number in (0, 1]"),
    ],
)
def test_generate_flag_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as error:
        train_mac.main(["--out", str(tmp_path / "run"), *flags])
    assert error.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def damage(path, how):
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "random bytes":
        path.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    elif how == "foreign dict":
        torch.save({"model": {"weight": torch.zeros(2)}, "step": 3}, path)
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "--generate: cannot read {path} (RuntimeError: PytorchStreamReader failed"),
        ("random bytes", "--generate: cannot read {path} (UnpicklingError: "),
        ("foreign dict", "--generate: {path} is not a train_mac.py checkpoint (it lacks arch, config, "),
        ("missing", "--generate: no checkpoint at {path}"),
    ],
)
def test_generate_from_a_broken_checkpoint_is_one_line(tmp_path, how, message):
    out = tmp_path / "run"
    assert train(out, "--steps", "1") == 0
    damage(out / "checkpoint.pt", how)
    with pytest.raises(SystemExit) as error:
        train_mac.main(["--out", str(out), "--generate", "def "])
    text = error.value.code  # the interpreter prints it to stderr, and exits with status 1
    assert isinstance(text, str) and "\n" not in text
    assert text.startswith(message.format(path=out / "checkpoint.pt"))


def test_generate_from_a_corrupted_checkpoint_exits_1_without_traceback(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--steps", "1") == 0
    damage(out / "checkpoint.pt", "truncated")
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--generate", "def "],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"--generate: cannot read {out / 'checkpoint.pt'}")


def test_generate_names_a_checkpoint_whose_weights_do_not_fit(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--steps", "1") == 0
    saved = checkpoint(out)
    saved["model"]["token_emb.weight"] = torch.zeros(3, 3)
    torch.save(saved, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"--generate: cannot rebuild the model of .*checkpoint.pt \(ValueError: its weights "
                                         r"do not fit its mac model: shape of token_emb.weight is \(3, 3\) in the file"):
        train_mac.main(["--out", str(out), "--generate", "def "])


# ----------------------------------------------------------------------------- resume


class Crash(Exception):
    pass


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, monkeypatch):
    flags = ("--steps", "8", "--checkpoint-every", "3", "--validate-every", "2", "--sample-every", "3")
    assert train(tmp_path / "straight", *flags) == 0

    # the same run, killed during step 5, after its checkpoint at step 3
    original = train_mac.train_step

    def crashing(*args, **kwargs):
        if args[-1] == 5:
            raise Crash
        return original(*args, **kwargs)

    monkeypatch.setattr(train_mac, "train_step", crashing)
    with pytest.raises(Crash):
        train(tmp_path / "resumed", *flags)
    monkeypatch.setattr(train_mac, "train_step", original)
    assert checkpoint(tmp_path / "resumed")["step"] == 3
    assert max(steps_of(metrics(tmp_path / "resumed"), "train_loss")) == 4

    assert train_mac.main(["--out", str(tmp_path / "resumed"), "--resume"]) == 0  # no other flag needed

    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    for key in ("train_loss", "grad_norm", "lr", "valid_bpb"):
        assert steps_of(resumed, key) == steps_of(straight, key), key
    assert len(resumed) == len(straight) == 8
    a, b = checkpoint(tmp_path / "straight")["model"], checkpoint(tmp_path / "resumed")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resume_refuses_what_would_not_continue_the_same_run(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--resume: no checkpoint at"):
        train(out, "--resume")
    assert train(out, "--steps", "2") == 0
    with pytest.raises(SystemExit, match="exists: add --resume to continue that run, --overwrite"):
        train(out, "--steps", "2")
    with pytest.raises(SystemExit, match=r"--resume: --seq-len 16 \(the checkpoint has 32\), --lr 0.1 \(the checkpoint has 0.003\)"):
        train(out, "--resume", "--seq-len", "16", "--lr", "0.1")
    with pytest.raises(SystemExit, match="--resume: the checkpoint was trained on"):
        (tmp_path / "other.txt").write_bytes(b"hello world " * 1000)
        train(out, "--resume", "--data", str(tmp_path / "other.txt"))

    for content, message in ((b"garbage", "cannot read"), (None, "is not a train_mac.py checkpoint")):
        broken = tmp_path / "broken"
        broken.mkdir(exist_ok=True)
        if content is None:
            torch.save({"model": {}}, broken / "checkpoint.pt")
        else:
            (broken / "checkpoint.pt").write_bytes(content)
        with pytest.raises(SystemExit, match=message):
            train(broken, "--resume")

    # a finished run resumed with --eval-test only evaluates; more --steps continue it
    capsys.readouterr()
    assert train(out, "--resume", "--eval-test") == 0
    assert "done: step 2, validation" in capsys.readouterr().out
    assert sorted(steps_of(metrics(out), "test_bpb")) == [2]
    assert train(out, "--resume", "--steps", "3") == 0
    assert checkpoint(out)["step"] == 3
    assert train(out, "--overwrite", "--steps", "1") == 0
    assert checkpoint(out)["step"] == 1 and len(metrics(out)) == 1


# ----------------------------------------------------------------------------- robustness


def corrupt_parameters_after(step):
    """A train_step that, after step `step`, makes a parameter infinite (the loss was finite)."""
    original = train_mac.train_step

    def corrupting(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        if args[-1] == step:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        return result

    return corrupting


@pytest.mark.parametrize("fault", ["nan loss", "inf parameters"])
def test_non_finite_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch, fault):
    out = tmp_path / "run"
    original = train_mac.train_step
    flags = ["--steps", "8", "--checkpoint-every", "4", "--validate-every", "0"]
    if fault == "nan loss":
        flags += ["--debug-nan-at", "6"]
    else:
        monkeypatch.setattr(train_mac, "train_step", corrupt_parameters_after(8))
    assert train(out, *flags) == 1
    stdout = capsys.readouterr().out
    expected = "step 6: the loss is nan" if fault == "nan loss" else "step 8: the validation bits per byte are "
    assert expected in stdout
    assert "stopping. The last good checkpoint, step 4, is kept at" in stdout
    saved = checkpoint(out)
    assert saved["step"] == 4
    assert all(torch.isfinite(tensor).all() for tensor in saved["model"].values())
    assert max(steps_of(metrics(out), "train_loss")) == (5 if fault == "nan loss" else 7)  # the failed step is not logged
    # and the kept checkpoint continues the run
    monkeypatch.setattr(train_mac, "train_step", original)
    assert train_mac.main(["--out", str(out), "--resume", "--debug-nan-at", "100"]) == 0


def test_non_finite_parameters_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    # parameters gone infinite after a finite loss, at a checkpoint step without validation
    monkeypatch.setattr(train_mac, "evaluate", lambda *args: 1.0)
    monkeypatch.setattr(train_mac, "train_step", corrupt_parameters_after(4))
    assert train(tmp_path / "run", "--steps", "8", "--checkpoint-every", "2") == 1
    assert "step 4: the parameters are not finite; stopping. The last good checkpoint, step 2" in capsys.readouterr().out
    assert checkpoint(tmp_path / "run")["step"] == 2


def test_huge_learning_rate_diverges_cleanly(tmp_path, capsys):
    assert train(tmp_path / "run", "--steps", "30", "--lr", "1e30", "--warmup", "0", "--checkpoint-every", "1") == 1
    stdout = capsys.readouterr().out
    assert "stopping. The last good checkpoint, step" in stdout
    saved = checkpoint(tmp_path / "run")
    assert all(torch.isfinite(tensor).all() for tensor in saved["model"].values())


# ----------------------------------------------------------------------------- data


def test_unreachable_download_falls_back_in_one_line(tmp_path, capsys):
    target = tmp_path / "data" / "enwik8.zip"
    flags = ["--data", str(target), "--download", "--download-url", "http://127.0.0.1:9/enwik8.zip", "--steps", "1"]
    assert train(tmp_path / "run", *flags) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "enwik8" in line]
    assert len(lines) == 1
    assert lines[0].startswith("could not download enwik8 from http://127.0.0.1:9/enwik8.zip (")
    assert lines[0].endswith("): training on the offline corpus (Python standard library source)")
    assert not list(target.parent.glob("*"))  # nothing half-written


def test_explicit_missing_data_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="--data nowhere.gz: no such file"):
        train(tmp_path / "run", "--data", "nowhere.gz")


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/www over HTTP on a free local port."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args):
            super().__init__(*args, directory=str(root))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_keeps_only_a_verified_file(tmp_path, http_server):
    root, url = http_server
    with zipfile.ZipFile(root / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", b"<mediawiki>" * 100)
    (root / "junk.zip").write_bytes(b"not a zip")
    dest = tmp_path / "data" / "enwik8.zip"

    with pytest.raises(ValueError, match="expected one file of 1,099 bytes, got enwik8: 1,100 bytes"):
        train_mac.download_enwik8(f"{url}/enwik8.zip", dest, expected_size=1099, show_progress=False)
    with pytest.raises(ValueError, match="not a zip file"):
        train_mac.download_enwik8(f"{url}/junk.zip", dest, expected_size=1100, show_progress=False)
    with pytest.raises(OSError):
        train_mac.download_enwik8(f"{url}/missing.zip", dest, expected_size=1100, show_progress=False)
    assert not list(dest.parent.glob("*"))

    assert train_mac.download_enwik8(f"{url}/enwik8.zip", dest, expected_size=1100, show_progress=False) == dest
    assert train_mac.read_bytes(dest) == b"<mediawiki>" * 100
    assert list(dest.parent.glob("*")) == [dest]


def test_reads_raw_gzip_and_zip_and_splits_enwik8_90_5_5(tmp_path):
    data = bytes(range(256)) * 10
    (tmp_path / "raw").write_bytes(data)
    (tmp_path / "file.gz").write_bytes(gzip.compress(data))
    with zipfile.ZipFile(tmp_path / "file.zip", "w") as z:
        z.writestr("enwik8", data)
    for name in ("raw", "file.gz", "file.zip"):
        assert train_mac.read_bytes(tmp_path / name) == data
    assert [len(part) for part in train_mac.split(bytes(train_mac.ENWIK8_SIZE))] == [90_000_000, 5_000_000, 5_000_000]
    assert [len(part) for part in train_mac.split(bytes(1000))] == [900, 50, 50]


def test_training_windows_are_consecutive_bytes():
    data = torch.arange(100, dtype=torch.uint8)
    batch = train_mac.windows(data, torch.tensor([0, 7, 90]), 9)
    assert batch.dtype == torch.long and batch.shape == (3, 10)
    assert torch.equal(batch, torch.tensor([0, 7, 90])[:, None] + torch.arange(10))


def test_gradient_accumulation_is_scaled_like_one_big_batch(tmp_path):
    # the stream draws the same windows either way, so step 1 must match to rounding
    assert train(tmp_path / "big", "--steps", "2", "--batch-size", "4") == 0
    assert train(tmp_path / "accum", "--steps", "2", "--batch-size", "2", "--grad-accum", "2") == 0
    big, accum = metrics(tmp_path / "big"), metrics(tmp_path / "accum")
    for key in ("train_loss", "grad_norm"):
        assert steps_of(accum, key)[1] == pytest.approx(steps_of(big, key)[1], rel=1e-5)
    assert steps_of(accum, "train_loss")[2] == pytest.approx(steps_of(big, "train_loss")[2], rel=1e-4)


def test_architecture_flags_change_the_model_and_must_match_on_resume(tmp_path):
    flags = ("--steps", "2", "--segment-len", "16", "--chunk-size", "2", "--memory-layers", "1,2")
    assert train(tmp_path / "run", *flags) == 0
    arch = checkpoint(tmp_path / "run")["arch"]
    assert (arch["segment_len"], arch["neural_memory_kwargs"]["chunk_size"], tuple(arch["neural_memory_layers"])) == (16, 2, (1, 2))
    model = train_mac.build_model("mac", arch)
    memories = [layer[1].memory for layer in model.layers]
    assert all(memory is not None and memory.chunk_size == 2 for memory in memories)
    assert model.segment_len == 16
    with pytest.raises(SystemExit, match=r"--chunk-size 4 \(the checkpoint has 2\)"):
        train_mac.main(["--out", str(tmp_path / "run"), "--resume", "--steps", "3", "--chunk-size", "4"])
    assert train_mac.main(["--out", str(tmp_path / "run"), "--resume", "--steps", "3"]) == 0
    assert checkpoint(tmp_path / "run")["arch"] == arch


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--segment-len", "10"], r"segment_len \(10\) must be a multiple of the neural memory's chunk_size \(4\)"),
        (["--memory-layers", "3"], r"neural_memory_layers must be layer numbers in 1..2, got \[3\]"),
        (["--model", "lmm", "--segment-len", "8"], "--segment-len does not apply to --model lmm"),
        (["--model", "window", "--chunk-size", "2", "--memory-layers", "1"], "--chunk-size, --memory-layers do not apply"),
    ],
)
def test_architecture_flag_errors_name_the_flag(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train(tmp_path / "run", "--steps", "1", *flags)


def test_the_graphed_training_step_gives_the_eager_losses(tmp_path, monkeypatch, capsys):
    # on a CPU the CUDA graph is stood in for by rerunning the captured step (cuda_graphs.rerun_eagerly):
    # what this checks is the plumbing around it (captured on zero ids without drawing data, ids copied
    # in, gradients accumulated over micro-batches into the captured .grad and zeroed, not freed, between steps)
    flags = ("--steps", "3", "--grad-accum", "2", "--validate-every", "0", "--sample-len", "0")
    assert train(tmp_path / "eager", *flags) == 0
    monkeypatch.setattr(train_mac, "use_cuda_graphs", lambda wanted, device, world: True)
    monkeypatch.setattr(train_mac, "GRAPH_CAPTURE", rerun_eagerly)
    assert train(tmp_path / "graphed", *flags) == 0
    assert "cuda graphs: a micro-batch's forward and backward captured in" in capsys.readouterr().out
    eager, graphed = metrics(tmp_path / "eager"), metrics(tmp_path / "graphed")
    for key in ("train_loss", "grad_norm", "valid_bpb"):
        assert steps_of(graphed, key) == steps_of(eager, key), key
    a, b = checkpoint(tmp_path / "eager")["model"], checkpoint(tmp_path / "graphed")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: operation not permitted when stream is capturing"),
                                   ValueError("the target cache holds one tensor at two places")])
def test_a_failed_graphed_sample_falls_back_to_eager_sampling(tmp_path, monkeypatch, capsys, error):
    original, calls = train_mac.sample_text, []

    def sample_text(*args):
        cuda_graphs = args[-1]
        calls.append(cuda_graphs)
        if cuda_graphs:
            raise error
        return original(*args)

    monkeypatch.setattr(train_mac, "sample_text", sample_text)
    assert train(tmp_path / "run", "--steps", "4", "--sample-every", "2") == 0
    out = capsys.readouterr().out
    assert f"sampling from CUDA graphs failed ({type(error).__name__}: {error}" in out
    assert out.count("sample at step") == 2 and calls == [True, False, False]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_graphs_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--cuda-graphs: needs a CUDA device, this run is on cpu"):
        train(tmp_path / "run", "--cuda-graphs")
    assert train_mac.use_cuda_graphs(None, torch.device("cpu"), 1) is False
    assert train_mac.use_cuda_graphs(None, torch.device("cuda"), 1) is True
    assert train_mac.use_cuda_graphs(None, torch.device("cuda"), 2) is False
    with pytest.raises(SystemExit, match="not with several processes"):
        train_mac.use_cuda_graphs(True, torch.device("cuda"), 2)


# ----------------------------------------------------------------------------- models, plot


@pytest.mark.parametrize("name", sorted(train_mac.MODEL_CLASSES))
def test_every_model_builds_and_trains(tmp_path, name):
    assert isinstance(train_mac.build_model(name, "test"), train_mac.MODEL_CLASSES[name])
    assert train(tmp_path / "run", "--model", name, "--steps", "2") == 0
    assert checkpoint(tmp_path / "run")["config"]["model"] == name


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_bpb": 8.0}\n')
    assert train_mac.plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png") is False
    assert not (tmp_path / "curves.png").exists()


def test_plot_draws_both_curves_with_matplotlib(tmp_path, monkeypatch):
    ax = mock.MagicMock()
    fig = mock.MagicMock()
    fig.savefig.side_effect = lambda path, **kwargs: Path(path).write_bytes(b"\x89PNG fake")
    pyplot = types.SimpleNamespace(subplots=mock.MagicMock(return_value=(fig, ax)), close=mock.MagicMock())
    matplotlib = types.SimpleNamespace(use=mock.MagicMock(), pyplot=pyplot)
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    records = [{"step": 1, "train_bpb": 8.0}, {"step": 2, "train_bpb": 6.0, "valid_bpb": 6.5}, {"step": 2, "test_bpb": 6.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    assert train_mac.plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", "title") is True
    matplotlib.use.assert_called_once_with("Agg")
    curves = [call.args for call in ax.plot.call_args_list]
    assert curves == [((1, 2), (8.0, 6.0)), ((2,), (6.5,), "o-")]
    assert fig.savefig.call_args.kwargs["format"] == "png"
    assert (tmp_path / "curves.png").read_bytes() == b"\x89PNG fake"
    pyplot.close.assert_called_once_with(fig)


# ----------------------------------------------------------------------------- distributed


def test_two_processes_with_ddp_on_cpu(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(SCRIPT),
               "--preset", "test", "--steps", "4", "--checkpoint-every", "2", "--grad-accum", "2", "--out", str(out)]
    result = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("enwik8 not found") == 1 and result.stdout.count("done: step 4") == 1  # rank 0 only
    assert "2 process(es) | 2 x 32 bytes x 2 accumulated x 2 = 256 per step" in result.stdout
    assert sorted(steps_of(metrics(out), "train_loss")) == [1, 2, 3, 4]
    saved = checkpoint(out)
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2
    assert not torch.equal(saved["rng"][0]["data"], saved["rng"][1]["data"])  # a data stream per rank

    resumed = subprocess.run(command + ["--resume", "--steps", "5"],
                             cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert checkpoint(out)["step"] == 5
