"""Recipes: how to build an object again, as JSON, from the arguments it was constructed with.

A class that inherits ``Recorded`` remembers the arguments of each instance's constructor (the
defaults filled in). ``encode`` turns such an instance, and the values it was given, into JSON:

- ``None``, bools, numbers and strings as they are; lists and ``str``-keyed dicts element-wise;
- tuples as ``{"__tuple__": [...]}`` (constructors check them: ``down_dims=(64, 128)``);
- numpy arrays as ``{"__ndarray__": [...], "dtype": ...}``;
- a ``Recorded`` instance or a dataclass as ``{"__class__": "module:Name", "kwargs": {...}}``
  (modules given to a constructor are recorded the same way, recursively);
- a ``functools.partial`` (an env factory) as ``{"__partial__": "module:name", "args", "kwargs"}``;
- a class or a function as ``{"__callable__": "module:name"}``;
- a Hugging Face ``PreTrainedModel`` (Florence-2) as ``{"__hf_model__": "module:Name", "config": {...}}``,
  its ``config.to_dict()``: rebuilt with random weights (``_from_config``), which the saved state then
  replaces;
- a Hugging Face tokenizer as ``{"__hf_tokenizer__": "tokenizer"}``, when ``encode`` is given a
  ``folder``: it is saved there (``save_pretrained``), and ``decode`` loads it from that folder.

``decode`` builds the objects again. Only importable names are recorded: a class defined in a
script (``__main__``) or inside a function cannot be, and ``encode`` says so.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
from typing import Any

import numpy as np

_ARGS = "_recorded_arguments"  # instance attribute: {name: value} of the constructor's arguments


class Recorded:
    """Mixin: every instance keeps the arguments its own class's constructor was called with."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)


def _recording(init):
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        if _ARGS not in self.__dict__:  # the outermost constructor (the instance's class), not a super().__init__
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            recorded = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    recorded.update(value)
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    recorded[f"*{name}"] = value  # encode refuses it: a recipe passes arguments by name
                else:
                    recorded[name] = value
            object.__setattr__(self, _ARGS, recorded)  # past nn.Module.__setattr__, before Module.__init__ ran
        init(self, *args, **kwargs)

    return wrapped


def arguments(obj: Recorded) -> dict[str, Any]:
    """The constructor arguments ``obj`` was built with."""
    return obj.__dict__[_ARGS]


def import_path(obj: Any) -> str:
    """``"package.module:Name"`` of a class or function, refused when it cannot be imported again."""
    module, name = obj.__module__, obj.__qualname__
    if module == "__main__" or "<locals>" in name:
        raise TypeError(f"{module}.{name} is defined in a script or a function, so a saved policy could not import it "
                        "again; define it in a module of the package")
    return f"{module}:{name}"


def locate(path: str) -> Any:
    """The object named ``"package.module:Name"``."""
    module, _, name = path.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def encode(value: Any, where: str = "value", folder: str | None = None) -> Any:
    """``value`` -> JSON (see the module docstring); ``where`` names it in errors, ``folder`` takes tokenizers."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{where}[{i}]", folder) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{where}[{i}]", folder) for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where} has a key {bad[0]!r} that is not a string; a recipe's dicts need string keys")
        return {k: encode(v, f"{where}[{k!r}]", folder) for k, v in value.items()}
    if _ARGS in getattr(value, "__dict__", {}):
        return {"__class__": import_path(type(value)), "kwargs": encode_arguments(value, where, folder=folder)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kwargs = {f.name: encode(getattr(value, f.name), f"{where}.{f.name}", folder)
                  for f in dataclasses.fields(value) if f.init}
        return {"__class__": import_path(type(value)), "kwargs": kwargs}
    if isinstance(value, functools.partial):
        return {"__partial__": import_path(value.func), "args": encode(list(value.args), f"{where}.args", folder),
                "kwargs": encode(dict(value.keywords), f"{where}.keywords", folder)}
    if isinstance(value, type) or inspect.isfunction(value):
        return {"__callable__": import_path(value)}
    if hasattr(type(value), "_from_config") and hasattr(getattr(value, "config", None), "to_dict"):
        return {"__hf_model__": import_path(type(value)), "config": value.config.to_dict()}
    if folder is not None and hasattr(value, "save_pretrained") and hasattr(value, "pad_token_id"):
        value.save_pretrained(os.path.join(folder, "tokenizer"))  # one tokenizer per policy (Florence's)
        return {"__hf_tokenizer__": "tokenizer"}
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which has no recipe: pass "
                    "plain values, or build it from a class that inherits mimictest.recipe.Recorded")


def encode_arguments(obj: Recorded, where: str = "value", skip: tuple[str, ...] = (),
                     folder: str | None = None) -> dict[str, Any]:
    """The JSON of ``obj``'s constructor arguments, without the names in ``skip``."""
    name = type(obj).__qualname__
    return {k: encode(v, f"{where} ({name}).{k}", folder) for k, v in arguments(obj).items() if k not in skip}


def decode(value: Any, folder: str | None = None) -> Any:
    """JSON from ``encode`` -> the values, with every recorded object built again (tokenizers from ``folder``)."""
    if isinstance(value, list):
        return [decode(v, folder) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(decode(v, folder) for v in value["__tuple__"])
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=value["dtype"])
    if "__class__" in value:
        return locate(value["__class__"])(**decode(value["kwargs"], folder))
    if "__partial__" in value:
        args, kwargs = decode(value["args"], folder), decode(value["kwargs"], folder)
        return functools.partial(locate(value["__partial__"]), *args, **kwargs)
    if "__callable__" in value:
        return locate(value["__callable__"])
    if "__hf_model__" in value:
        cls = locate(value["__hf_model__"])
        return cls._from_config(cls.config_class.from_dict(value["config"]))
    if "__hf_tokenizer__" in value:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.path.join(folder, value["__hf_tokenizer__"]), local_files_only=True)
    return {k: decode(v, folder) for k, v in value.items()}
