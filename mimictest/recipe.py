"""Recipes: how to build an object again, as JSON, from the arguments it was constructed with.

A class that inherits ``Recorded`` remembers the arguments of each instance's constructor (the
defaults filled in). ``encode`` turns such an instance, and the values it was given, into JSON:

- ``None``, bools, numbers and strings as they are; lists and ``str``-keyed dicts element-wise;
- tuples as ``{"__tuple__": [...]}`` (constructors check them: ``down_dims=(64, 128)``);
- numpy arrays as ``{"__ndarray__": [...], "dtype": ...}``;
- a ``Recorded`` instance or a dataclass as ``{"__class__": "module:Name", "kwargs": {...}}``
  (modules given to a constructor are recorded the same way, recursively);
- a ``functools.partial`` (an env factory) as ``{"__partial__": "module:name", "args", "kwargs"}``;
- a class or a function as ``{"__callable__": "module:name"}``.

``decode`` builds the objects again. Only importable names are recorded: a class defined in a
script (``__main__``) or inside a function cannot be, and ``encode`` says so.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
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


def encode(value: Any, where: str = "value") -> Any:
    """``value`` -> JSON (see the module docstring); ``where`` names it in errors."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where} has a key {bad[0]!r} that is not a string; a recipe's dicts need string keys")
        return {k: encode(v, f"{where}[{k!r}]") for k, v in value.items()}
    if _ARGS in getattr(value, "__dict__", {}):
        return {"__class__": import_path(type(value)), "kwargs": encode_arguments(value, where)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kwargs = {f.name: encode(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value) if f.init}
        return {"__class__": import_path(type(value)), "kwargs": kwargs}
    if isinstance(value, functools.partial):
        return {"__partial__": import_path(value.func), "args": encode(list(value.args), f"{where}.args"),
                "kwargs": encode(dict(value.keywords), f"{where}.keywords")}
    if isinstance(value, type) or inspect.isfunction(value):
        return {"__callable__": import_path(value)}
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which has no recipe: pass "
                    "plain values, or build it from a class that inherits mimictest.recipe.Recorded")


def encode_arguments(obj: Recorded, where: str = "value", skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON of ``obj``'s constructor arguments, without the names in ``skip``."""
    name = type(obj).__qualname__
    return {k: encode(v, f"{where} ({name}).{k}") for k, v in arguments(obj).items() if k not in skip}


def decode(value: Any) -> Any:
    """JSON from ``encode`` -> the values, with every recorded object built again."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=value["dtype"])
    if "__class__" in value:
        return locate(value["__class__"])(**decode(value["kwargs"]))
    if "__partial__" in value:
        return functools.partial(locate(value["__partial__"]), *decode(value["args"]), **decode(value["kwargs"]))
    if "__callable__" in value:
        return locate(value["__callable__"])
    return {k: decode(v) for k, v in value.items()}
