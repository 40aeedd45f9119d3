"""The long-range recall benchmark (benchmarks/recall.py): its task generator, and (slow) a
reduced run in which a memory model must beat the window-only baseline beyond the window."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "recall.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("recall_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("pairs, distance", [(1, 8), (4, 32), (8, 64), (3, None)])
def test_task_layout(pairs, distance):
    recall = load_benchmark()
    task = recall.RecallTask(num_filler=16, num_keys=16, num_values=16, pairs=8, seq_len=128)
    ids, targets, mask, distances = task.sample(32, torch.Generator().manual_seed(0), pairs=pairs, distance=distance)
    assert ids.shape == targets.shape == mask.shape == (32, 128)
    assert ids.min() >= 0 and ids.max() < task.num_tokens
    assert (mask.sum(dim=1) == pairs).all()
    rows, cols = mask.nonzero(as_tuple=True)
    # logits at a masked position predict the next token, the answer: a value after `marker key`
    assert torch.equal(targets[rows, cols], ids[rows, cols + 1])
    values = range(task.num_filler + task.num_keys, task.marker)
    assert all(v in values for v in targets[rows, cols].tolist())
    assert (ids[rows, cols - 1] == task.marker).all()
    keys = ids[rows, cols]
    assert ((keys >= task.num_filler) & (keys < task.num_filler + task.num_keys)).all()
    # the fact `key value` sits `distance` tokens before the answer
    d = distances[rows, cols]
    fact_value = cols + 1 - d
    assert torch.equal(ids[rows, fact_value - 1], keys)
    assert torch.equal(ids[rows, fact_value], targets[rows, cols])
    if distance is not None:
        per_sequence = torch.full((32,), 10**9).scatter_reduce(0, rows, d, reduce="amin")
        assert (per_sequence == distance).all()


def test_merge_combines_runs_of_different_models(tmp_path):
    recall = load_benchmark()
    tiny = ["--steps", "2", "--eval-windows", "1", "--eval-sequences", "2", "--dim", "16", "--dim-head", "8",
            "--heads", "2", "--pairs", "2", "--seq-len", "32"]
    lmm = recall.run(recall.parse_args(["--models", "lmm", "--out", str(tmp_path / "a"), *tiny]))
    window = recall.run(recall.parse_args(["--models", "window", "--out", str(tmp_path / "b"), *tiny]))
    merged = recall.merge([tmp_path / "a" / "results.json", tmp_path / "b" / "results.json"], tmp_path / "m")
    assert list(merged["results"]) == ["lmm", "window"]
    for name, run in (("lmm", lmm), ("window", window)):
        assert merged["results"][name]["accuracy"] == run["results"][name]["accuracy"]
    assert (tmp_path / "m" / "results.json").exists()
    # runs of another setting, or the same model twice, are refused
    recall.run(recall.parse_args(["--models", "mal", "--out", str(tmp_path / "c"), *tiny, "--seed", "1"]))
    with pytest.raises(SystemExit, match="seed"):
        recall.merge([tmp_path / "a" / "results.json", tmp_path / "c" / "results.json"], tmp_path / "x")
    with pytest.raises(SystemExit, match="lmm appears"):
        recall.merge([tmp_path / "a" / "results.json", tmp_path / "a" / "results.json"], tmp_path / "x")


@pytest.mark.slow
def test_memory_beats_window_baseline(tmp_path):
    """300 steps of MAL (memory, then sliding-window attention) and of the window-only baseline
    (same window, memory off): beyond the window the memory model must be far above chance and
    the baseline must stay near it. About 1.5-3 minutes on one CPU thread."""
    recall = load_benchmark()
    args = recall.parse_args([
        "--models", "mal,window", "--steps", "300", "--eval-windows", "4,8", "--eval-sequences", "64",
        "--log-every", "100", "--out", str(tmp_path),
    ])
    payload = recall.run(args)
    chance = payload["chance"]
    results = payload["results"]
    assert (tmp_path / "results.json").exists()
    # measured (torch 2.13 CPU): mal 1.00 (needle) / 0.66 (8 facts), window 0.05-0.06, chance 0.0625
    for setting in ("needle", "mqar"):
        for window in ("4", "8"):
            memory = results["mal"]["accuracy"][setting][window]
            baseline = results["window"]["accuracy"][setting][window]
            assert baseline < chance + 0.1, (setting, window, baseline)
            assert memory > max(0.5, baseline + 0.3), (setting, window, memory, baseline)


def load_paths_probe():
    spec = importlib.util.spec_from_file_location("recall_paths", BENCHMARK.parent / "recall_paths.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paths_probe_switches_off_exactly_the_reads_it_names(float64):
    # recall_paths.py attributes MAC's recall to its reads by zeroing them: with all three off,
    # a token two segments back must not reach the output; each read alone must; and leaving
    # the block must restore the model
    from titans_pytorch import MemoryAsContextTransformer

    probe = load_paths_probe()
    torch.manual_seed(0)
    model = MemoryAsContextTransformer(
        num_tokens=32, dim=16, depth=2, segment_len=4, num_persist_mem_tokens=2, num_longterm_mem_tokens=2,
        heads=2, dim_head=8, num_residual_streams=1, neural_memory_kwargs=dict(chunk_size=2, heads=2, dim_head=8),
    )
    ids = torch.randint(0, 32, (2, 16))
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 5) % 32  # segment 1; segment 3 is scored

    def influence():
        return (model(changed)[:, 12:] - model(ids)[:, 12:]).abs().max().item()

    before = model(ids)
    with probe.switched_off(model, per_token=True, longterm=True, gate=True):
        assert influence() == 0.0
    for kept in ("per_token", "longterm", "gate"):
        off = {name: name != kept for name in ("per_token", "longterm", "gate")}
        with probe.switched_off(model, **off):
            assert influence() > 1e-6, kept
    assert torch.equal(model(ids), before)


def test_store_input_control_stores_the_layer_input(float64):
    # recall_paths.py --store-input: each memory must be given the mixer's input x, not x + Attn
    from titans_pytorch import MemoryAsContextTransformer

    probe = load_paths_probe()
    torch.manual_seed(0)
    model = MemoryAsContextTransformer(
        num_tokens=32, dim=16, depth=2, segment_len=4, num_longterm_mem_tokens=2, heads=2, dim_head=8,
        num_residual_streams=1, neural_memory_kwargs=dict(chunk_size=2, heads=2, dim_head=8),
    )
    seen = {}
    for index, layer in enumerate(model.layers):
        layer[1].register_forward_pre_hook(lambda m, args, i=index: seen.setdefault(("x", i), []).append(args[0]))
    with probe.storing_layer_input(model):
        for index, layer in enumerate(model.layers):  # registered after the control's hook: sees its result
            layer[1].memory.register_forward_pre_hook(
                lambda m, args, i=index: seen.setdefault(("stored", i), []).append(args[0]))
        model(torch.randint(0, 32, (2, 10)))
    for index in range(len(model.layers)):
        stored = torch.cat(seen[("stored", index)], dim=1)
        torch.testing.assert_close(stored, seen[("x", index)][0], atol=1e-12, rtol=0)


def test_bare_builds_the_library_defaults_and_trains_at_a_constant_rate(monkeypatch):
    import titans_pytorch

    recall = load_benchmark()
    args = recall.parse_args(["--bare", "--dim", "16", "--depth", "1", "--window", "4", "--steps", "3", "--lr", "0.01",
                              "--batch", "2", "--log-every", "1", "--heads", "2", "--persist", "3", "--chunk", "2"])
    task = recall.RecallTask(num_filler=8, num_keys=4, num_values=4, pairs=2, seq_len=32)
    torch.manual_seed(0)
    model = recall.build_model("mac", args, task)
    torch.manual_seed(0)
    expected = titans_pytorch.MemoryAsContextTransformer(num_tokens=task.num_tokens, dim=16, depth=1, segment_len=4)
    # the attention and memory flags are ignored: same parameters as the bare constructor call
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in expected.named_parameters()}
    window = recall.build_model("window", args, task)
    assert all(m.memory is None for m in window.modules() if hasattr(m, "memory"))
    rates, clipped = [], []
    step = torch.optim.AdamW.step

    def record(self, *a, **k):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clipped.append(1))
    recall.train(model, task, args, 0.01)
    assert rates == [0.01] * 3 and not clipped
