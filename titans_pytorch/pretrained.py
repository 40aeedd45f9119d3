"""Saving a model as a directory, and loading it back, without pickle.

`model.save_pretrained(path)` writes two files:

- `config.json`: the class and the constructor arguments, as plain JSON (tuples become
  lists and come back as tuples; a built-in memory network passed as `neural_memory_model`
  becomes `{"__class__": "MemoryMLP", "arguments": {...}}`), plus the format's name and
  version and the library's version;
- `model.safetensors`: the state dict (safetensors: tensors and their names, no code).

`Class.from_pretrained(path)` rebuilds the model from `config.json` and loads the weights,
checking that every name and shape fits. `config.json` is written last and removed first,
so a directory whose writing was interrupted has no `config.json` and fails to load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .arguments import RecordsArguments
from .memory_models import LinearMemory, MemoryMLP, ResidualNormMemory

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
FORMAT, FORMAT_VERSION = "titans-pytorch model", 1
CLASS_KEY = "__class__"
MEMORY_MODELS = {cls.__name__: cls for cls in (LinearMemory, MemoryMLP, ResidualNormMemory)}


def _library_version() -> str:
    try:
        return metadata.version("titans-pytorch")
    except metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- arguments <-> JSON


def to_json(value, name: str):
    """`value`, the argument `name`, as plain JSON values; `TypeError` naming `name` if it
    cannot be described (a module other than the built-in memory networks, a tensor, ...)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [to_json(item, f"{name}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict):
        bad = [key for key in value if not isinstance(key, str) or key == CLASS_KEY]
        if bad:
            raise TypeError(f"{name}: config.json needs string keys other than {CLASS_KEY!r}, got {bad}")
        return {key: to_json(item, f"{name}[{key!r}]") for key, item in value.items()}
    if isinstance(value, nn.Module):
        if type(value) not in MEMORY_MODELS.values():
            raise TypeError(
                f"{name}: a {type(value).__name__} cannot be described in config.json (only the library's memory "
                f"networks {', '.join(MEMORY_MODELS)} can); save model.state_dict() with torch.save or safetensors "
                f"and rebuild the model with your own code"
            )
        return {CLASS_KEY: type(value).__name__, "arguments": arguments_to_json(value._constructor_arguments, name)}
    raise TypeError(f"{name}: a {type(value).__name__} cannot be saved in config.json")


def arguments_to_json(arguments: dict, prefix: str = "") -> dict:
    """Recorded constructor arguments (`RecordsArguments`) as plain JSON, keyed by name."""
    positional = [name for name in arguments if name.startswith("*")]
    if positional:
        raise TypeError(f"{prefix or 'the model'} was built with positional {positional[0]} arguments, which config.json cannot hold")
    return {name: to_json(value, f"{prefix}.{name}" if prefix else name) for name, value in arguments.items()}


def from_json(value):
    """The inverse of `to_json`: lists become tuples, memory-network specs modules."""
    if isinstance(value, list):
        return tuple(from_json(item) for item in value)
    if isinstance(value, dict):
        if CLASS_KEY not in value:
            return {key: from_json(item) for key, item in value.items()}
        name = value[CLASS_KEY]
        if name not in MEMORY_MODELS:
            raise ValueError(f"unknown memory network {name!r} (known: {', '.join(MEMORY_MODELS)})")
        return MEMORY_MODELS[name](**from_json(value.get("arguments", {})))
    return value


# ----------------------------------------------------------------------------- weights


def tensors_to_save(state_dict: dict) -> dict:
    """The state dict as contiguous CPU tensors that share no memory (safetensors stores each
    name's tensor on its own; tied tensors are copied)."""
    tensors, seen = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        tensors[name] = tensor
    return tensors


def state_dict_mismatch(expected: dict, found: dict) -> str | None:
    """What keeps `found` (a file's tensors) from loading into a model whose state dict is
    `expected`: missing names, unexpected names, shapes; None when it fits."""

    def listed(names):
        return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    problems = [f"missing {listed(missing)}"] if missing else []
    problems += [f"unexpected {listed(unexpected)}"] if unexpected else []
    problems += [
        f"shape of {name} is {tuple(found[name].shape)} in the file, {tuple(tensor.shape)} in the model"
        for name, tensor in expected.items()
        if name in found and found[name].shape != tensor.shape
    ]
    return "; ".join(problems) or None


def write_atomically(path: Path, write: Callable[[Path], None]):
    """`write(temporary_path)`, fsync, then rename over `path`: a reader (or a crash) sees the
    old file or the new one, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the mixin


class PretrainedMixin(RecordsArguments):
    """`save_pretrained(path)` and `from_pretrained(path)` for a module whose constructor
    arguments describe its architecture (recorded when it is built)."""

    def pretrained_config(self) -> dict:
        """What `config.json` holds: format, versions, class and constructor arguments.
        `TypeError` naming the argument that cannot be described."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "titans_pytorch_version": _library_version(),
            "class": type(self).__name__,
            "arguments": arguments_to_json(self._constructor_arguments),
        }

    def save_pretrained(self, path) -> Path:
        """Write `config.json` and `model.safetensors` into the directory `path` (created if
        needed; other files in it are left alone). Returns `path`."""
        path = Path(path)
        config = self.pretrained_config()  # fails before anything is written
        tensors = tensors_to_save(self.state_dict())
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).unlink(missing_ok=True)  # until the new one is written, the directory is incomplete
        write_atomically(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        write_atomically(path / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
        return path

    @classmethod
    def from_pretrained(cls, path, device=None):
        """The model saved in the directory `path` by `save_pretrained`, in eval mode, on
        `device` (default CPU), its floating-point weights in the dtype they were saved in.

        Called on a base class (`TitansTransformer.from_pretrained`), it builds whichever
        subclass `config.json` names. Raises `FileNotFoundError` for a missing directory or
        file and `ValueError` for a foreign or inconsistent one, naming what is wrong.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory (save_pretrained writes {CONFIG_NAME} and {WEIGHTS_NAME} there)")
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        config = _read_config(config_path)
        model_class = _subclass_named(cls, config["class"], config_path)
        try:
            with torch.random.fork_rng(devices=[]):  # the initialisation, overwritten below, leaves the RNG alone
                model = model_class(**from_json(config["arguments"]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{config_path}: cannot build a {model_class.__name__} from its arguments ({error})") from error

        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path}: no such file")
        try:
            tensors = load_file(weights_path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {weights_path} ({error})") from error
        mismatch = state_dict_mismatch(model.state_dict(), tensors)
        if mismatch:
            raise ValueError(f"{CONFIG_NAME} and {WEIGHTS_NAME} in {path} disagree: {mismatch}")
        dtypes = {tensor.dtype for tensor in tensors.values() if tensor.is_floating_point()}
        if len(dtypes) == 1:
            model.to(dtypes.pop())
        model.load_state_dict(tensors)
        return model.to(device).eval() if device is not None else model.eval()


def _read_config(config_path: Path) -> dict:
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no such file (written last by save_pretrained: without it the directory is incomplete)")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a titans-pytorch config (no \"format\": \"{FORMAT}\")")
    if not isinstance(config.get("format_version"), int) or config["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format version {config.get('format_version')!r} (titans-pytorch "
            f"{config.get('titans_pytorch_version')}); this titans-pytorch ({_library_version()}) reads version {FORMAT_VERSION}"
        )
    if not isinstance(config.get("class"), str) or not isinstance(config.get("arguments"), dict):
        raise ValueError(f"{config_path} lacks the model's \"class\" or its \"arguments\"")
    return config


def _subclass_named(cls, name: str, config_path: Path):
    """`cls` itself or its one subclass called `name`."""
    if cls.__name__ == name:
        return cls
    found, stack = [], list(cls.__subclasses__())
    while stack:
        subclass = stack.pop()
        found += [subclass] if subclass.__name__ == name and subclass not in found else []
        stack += subclass.__subclasses__()
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{config_path} names {name}, and several subclasses of {cls.__name__} have that name")
    raise ValueError(f"{config_path} holds a {name}, not a {cls.__name__}: load it with {name}.from_pretrained "
                     f"(or TitansTransformer.from_pretrained, which builds any of the four models)")
