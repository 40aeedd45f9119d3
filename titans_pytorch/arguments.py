"""Recording how a module was built, so that it can be built again (see `pretrained.py`)."""

from __future__ import annotations

import functools
import inspect


class RecordsArguments:
    """A mixin: an instance remembers the arguments of the constructor call that made it.

    Every `__init__` of a subclass is wrapped so that, once the outermost call returns,
    `instance._constructor_arguments` maps each parameter name of that call's signature to
    its value (the values passed, defaults filled in, `**kwargs` flattened), so that
    `type(instance)(**instance._constructor_arguments)` builds the same architecture
    (positional `*args`, if any, are kept under the key `"*args"`). Calls to `super().__init__(...)` inside it are not recorded.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)


def _recording(init):
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        outermost = "_constructor_arguments" not in self.__dict__
        if outermost:
            self.__dict__["_constructor_arguments"] = None  # in progress: inner __init__ calls record nothing
        init(self, *args, **kwargs)
        if outermost:
            self.__dict__["_constructor_arguments"] = _named_arguments(signature, self, args, kwargs)

    return __init__


def _named_arguments(signature: inspect.Signature, instance, args, kwargs) -> dict:
    bound = signature.bind(instance, *args, **kwargs)
    bound.apply_defaults()
    named = {}
    for index, (name, value) in enumerate(bound.arguments.items()):
        if index == 0:  # self
            continue
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                named[f"*{name}"] = value  # cannot be passed by name: `pretrained.py` refuses to save it
        else:
            named[name] = value
    return named
