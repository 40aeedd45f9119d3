"""save_pretrained / from_pretrained: config.json + model.safetensors rebuild every model exactly,
and a directory that does not fit its class, or itself, is refused with a message naming why."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from titans_pytorch import (
    LinearMemory,
    MemoryAsContextTransformer,
    MemoryAsGateTransformer,
    MemoryAsLayerTransformer,
    MemoryMLP,
    MemoryTransformer,
    ResidualNormMemory,
    TitansTransformer,
)

COMMON = dict(num_tokens=32, dim=16, depth=2, num_residual_streams=2, neural_memory_kwargs=dict(chunk_size=2, heads=2, dim_head=8))
ATTENTION = dict(segment_len=4, num_persist_mem_tokens=2, heads=2, dim_head=8, neural_memory_layers=(2,))
MODELS = {
    "mac": (MemoryAsContextTransformer, {**COMMON, **ATTENTION, "num_longterm_mem_tokens": 2, "sliding_window_attn": True}),
    "mag": (MemoryAsGateTransformer, {**COMMON, **ATTENTION}),
    "mal": (MemoryAsLayerTransformer, {**COMMON, **ATTENTION}),
    "lmm": (MemoryTransformer, COMMON),
}


def build(name, **kwargs):
    model_class, arguments = MODELS[name]
    torch.manual_seed(0)
    return model_class(**{**arguments, **kwargs})


def trained_a_little(model):
    """Weights that differ from any fresh initialisation."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return model


def assert_same_logits(model, loaded):
    ids = torch.randint(0, 32, (2, 13))
    assert torch.equal(model.eval()(ids), loaded(ids))


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_gives_identical_logits(float64, tmp_path, name):
    model = trained_a_little(build(name))
    assert model.save_pretrained(tmp_path / "saved") == tmp_path / "saved"
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]

    loaded = type(model).from_pretrained(tmp_path / "saved")
    assert type(loaded) is type(model) and not loaded.training
    assert next(loaded.parameters()).dtype == torch.float64  # the dtype it was saved in
    assert_same_logits(model, loaded)
    # the generic loader builds the class config.json names
    assert type(TitansTransformer.from_pretrained(tmp_path / "saved")) is type(model)
    assert loaded.pretrained_config() == model.pretrained_config()


@pytest.mark.parametrize(
    "memory_model",
    [LinearMemory(8), MemoryMLP(8, depth=3, expansion=1.5), ResidualNormMemory(8, model=MemoryMLP(8, depth=1))],
    ids=["linear", "mlp", "residual"],
)
def test_round_trip_with_a_builtin_memory_network(float64, tmp_path, memory_model):
    model = trained_a_little(build("mag", neural_memory_model=memory_model.double()))
    model.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "config.json").read_text())["arguments"]["neural_memory_model"]
    assert spec["__class__"] == type(memory_model).__name__
    loaded = MemoryAsGateTransformer.from_pretrained(tmp_path)
    assert type(loaded.layers[1][1].memory.model) is type(memory_model)
    assert_same_logits(model, loaded)


def test_config_is_plain_json_with_versions_and_tuples_come_back(tmp_path):
    build("mal").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "titans-pytorch model" and config["format_version"] == 1
    assert config["class"] == "MemoryAsLayerTransformer" and config["titans_pytorch_version"]
    assert config["arguments"]["neural_memory_layers"] == [2]
    assert config["arguments"]["neural_memory_kwargs"] == {"chunk_size": 2, "heads": 2, "dim_head": 8}
    loaded = MemoryAsLayerTransformer.from_pretrained(tmp_path)
    assert loaded._constructor_arguments["neural_memory_layers"] == (2,)


def test_loading_leaves_the_global_rng_alone_and_moves_to_device(tmp_path):
    build("lmm").save_pretrained(tmp_path)
    state = torch.get_rng_state()
    loaded = MemoryTransformer.from_pretrained(tmp_path, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    assert next(loaded.parameters()).device.type == "cpu"


def test_saving_again_replaces_the_export_and_keeps_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    build("lmm").save_pretrained(tmp_path)
    other = trained_a_little(build("lmm", dim=8, neural_memory_kwargs=dict(chunk_size=2, heads=1)))
    other.save_pretrained(tmp_path)
    assert_same_logits(other, MemoryTransformer.from_pretrained(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]


# ----------------------------------------------------------------------------- mismatches and foreign files


def edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_config_and_weights_that_disagree_are_named(tmp_path):
    build("mac").save_pretrained(tmp_path)
    edit_config(tmp_path, lambda config: config["arguments"].update(dim=24))
    with pytest.raises(ValueError, match=r"config.json and model.safetensors in .* disagree: .*shape of token_emb.weight "
                                         r"is \(32, 16\) in the file, \(32, 24\) in the model"):
        MemoryAsContextTransformer.from_pretrained(tmp_path)

    build("mac").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["to_logits.weight"]
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"disagree: missing to_logits.weight; unexpected extra.weight"):
        MemoryAsContextTransformer.from_pretrained(tmp_path)


def test_wrong_class_is_refused_and_named(tmp_path):
    build("mag").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a MemoryAsGateTransformer, not a MemoryAsContextTransformer: "
                                         "load it with MemoryAsGateTransformer.from_pretrained"):
        MemoryAsContextTransformer.from_pretrained(tmp_path)


def test_missing_foreign_and_incomplete_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        MemoryTransformer.from_pretrained(tmp_path / "nowhere")
    build("lmm").save_pretrained(tmp_path / "model")

    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: no such file"):
        MemoryTransformer.from_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="cannot read .*model.safetensors"):
        MemoryTransformer.from_pretrained(tmp_path / "model")

    edit_config(tmp_path / "model", lambda config: config.update(format_version=2))
    with pytest.raises(ValueError, match="format version 2 .* reads version 1"):
        MemoryTransformer.from_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')  # a Hugging Face config
    with pytest.raises(ValueError, match="is not a titans-pytorch config"):
        MemoryTransformer.from_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not JSON"):
        MemoryTransformer.from_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").unlink()  # what an interrupted save_pretrained leaves
    with pytest.raises(FileNotFoundError, match="config.json: no such file"):
        MemoryTransformer.from_pretrained(tmp_path / "model")


def test_arguments_that_no_longer_fit_the_class_are_named(tmp_path):
    build("lmm").save_pretrained(tmp_path)
    edit_config(tmp_path, lambda config: config["arguments"].update(wings=2))
    with pytest.raises(ValueError, match="cannot build a MemoryTransformer from its arguments .*wings"):
        MemoryTransformer.from_pretrained(tmp_path)


class Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x * self.weight


def test_a_custom_memory_network_cannot_be_saved(tmp_path):
    model = build("lmm", neural_memory_model=Doubler())
    with pytest.raises(TypeError, match="neural_memory_model: a Doubler cannot be described in config.json .*state_dict"):
        model.save_pretrained(tmp_path / "model")
    nested = build("lmm", neural_memory_model=ResidualNormMemory(8, model=Doubler()))
    with pytest.raises(TypeError, match=r"neural_memory_model.model: a Doubler"):
        nested.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()  # nothing written
