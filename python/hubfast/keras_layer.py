"""``hubfast.KerasLayer``: the layer of the Keras the program uses.

There are two implementations, one per Keras flavour, with the same
constructor and behaviour as ``tensorflow_hub.KerasLayer`` (0.16.1):
:class:`hubfast.keras.KerasLayer` (a Keras 3 layer) and
:class:`hubfast.tf_keras.KerasLayer` (a tf_keras layer, as tensorflow_hub's).
A model accepts only layers of its own Keras, and one process may hold both
kinds of model, so ``hubfast.KerasLayer(...)`` picks the flavour each time it
builds a layer (:func:`flavour_for_caller`):

1. tf_keras when ``tf.keras`` is tf_keras (``TF_USE_LEGACY_KERAS=1``, or
   TensorFlow < 2.16);
2. Keras 3 when the process has not imported ``tf_keras`` (nothing here could
   use a tf_keras layer);
3. otherwise the Keras that the code building the layer names: the innermost
   caller outside hubfast whose local variables, or the globals its code
   refers to, hold anything of ``tf_keras`` or of ``keras`` (Keras 3): a
   module, class, model or tensor (``tf`` alone names neither). When a Keras
   loads a saved model, its loading code is that caller;
4. otherwise (that code names both, or no code names either) tf_keras: what
   tensorflow_hub gives.

``isinstance(layer, hubfast.KerasLayer)`` holds for both flavours. Code that
wants one flavour whatever the program imports names it:
``hubfast.keras.KerasLayer`` or ``hubfast.tf_keras.KerasLayer`` (subclass those,
not this one). Both register as ``hubfast>KerasLayer`` with their Keras, so
models saved with either load again.

This module imports TensorFlow; ``hubfast`` imports it lazily, on first use of
``hubfast.KerasLayer``.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Dict, Iterable, Optional, Set

import tensorflow as tf

__all__ = ["KerasLayer", "KERAS_VERSION", "IS_KERAS_3", "flavour_for_caller"]

KERAS = "keras"
TF_KERAS = "tf_keras"
_MODULES = {KERAS: "hubfast.keras", TF_KERAS: "hubfast.tf_keras"}


def _keras_version() -> str:
    """The version of the Keras that ``tf.keras`` means in this process."""
    version_fn = getattr(tf.keras, "version", None)
    if callable(version_fn):
        return str(version_fn())
    return str(getattr(tf.keras, "__version__", "2"))


KERAS_VERSION = _keras_version()
IS_KERAS_3 = KERAS_VERSION.startswith("3.")  # what tf.keras means


def flavour_class(flavour: str) -> type:
    """``hubfast.keras.KerasLayer`` or ``hubfast.tf_keras.KerasLayer`` (imported on demand)."""
    return importlib.import_module(_MODULES[flavour]).KerasLayer


def _root_package(value: Any) -> Optional[str]:
    """"keras" or "tf_keras" when `value` is (or belongs to) that package, else None."""
    try:
        if isinstance(value, types.ModuleType):
            name = value.__name__
        elif isinstance(value, (type, types.FunctionType)):
            name = value.__module__
        else:
            name = type(value).__module__
    except Exception:  # noqa: BLE001 - an exotic object that cannot say
        return None
    if not isinstance(name, str):
        return None
    root = name.split(".", 1)[0]
    return root if root in (KERAS, TF_KERAS) else None


def _kerases_in(values: Iterable[Any]) -> Set[str]:
    named: Set[str] = set()
    for value in values:
        root = _root_package(value)
        if root:
            named.add(root)
    return named


def _kerases_named_by(frame: types.FrameType) -> Set[str]:
    """The Kerases a frame's code holds (its locals) or refers to (the globals it names)."""
    values = []
    if frame.f_locals is not frame.f_globals:
        values.extend(frame.f_locals.values())
    module_globals = frame.f_globals
    values.extend(module_globals[n] for n in frame.f_code.co_names if n in module_globals)
    return _kerases_in(values)


def _named_on_stack(frame: Optional[types.FrameType]) -> Set[str]:
    """The Kerases named by the innermost code outside hubfast that names any."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module != "hubfast" and not module.startswith("hubfast."):
            named = _kerases_named_by(frame)
            if named:
                return named
        frame = frame.f_back
    return set()


def flavour_for_caller(frame: Optional[types.FrameType] = None) -> str:
    """The flavour ``hubfast.KerasLayer(...)`` builds here: "keras" or "tf_keras".

    `frame`: where to start looking for the constructing code (default: the caller).
    See the module docstring for the rule.
    """
    if not IS_KERAS_3:
        return TF_KERAS
    if TF_KERAS not in sys.modules:
        return KERAS
    named = _named_on_stack(frame or sys._getframe(1))  # pylint: disable=protected-access
    return named.pop() if len(named) == 1 else TF_KERAS


class _ChooseFlavour(type):
    """Metaclass of :class:`KerasLayer`: building one builds the flavour the caller uses."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return flavour_class(flavour_for_caller())(*args, **kwargs)

    def __instancecheck__(cls, obj: Any) -> bool:
        return any(isinstance(obj, c) for c in _loaded_flavours())

    def __subclasscheck__(cls, sub: type) -> bool:
        return sub is cls or any(issubclass(sub, c) for c in _loaded_flavours())


def _loaded_flavours() -> list:
    """The flavour classes imported so far (an object of another cannot exist yet)."""
    return [sys.modules[m].KerasLayer for m in _MODULES.values()
            if m in sys.modules and hasattr(sys.modules[m], "KerasLayer")]


class KerasLayer(metaclass=_ChooseFlavour):
    """Wraps a SavedModel (or a legacy TF1 Hub format module) as a layer of the program's Keras.

    ``KerasLayer(handle, trainable=False, arguments=None, *, tags=None,
    signature=None, signature_outputs_as_dict=None, output_key=None,
    output_shape=None, load_options=None, **layer_kwargs)`` returns a
    :class:`hubfast.keras.KerasLayer` or a :class:`hubfast.tf_keras.KerasLayer`,
    as :func:`flavour_for_caller` decides; see those for the arguments.
    """

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> Any:
        """Rebuilds a layer from ``get_config()`` (Keras' deserialisation calls this)."""
        return flavour_class(flavour_for_caller()).from_config(config)


def _register_loaded_kerases() -> None:
    """Registers ``hubfast>KerasLayer`` with each Keras already in use, so that
    ``load_model`` finds it after ``import hubfast.keras_layer`` (as before the split).
    Imports no Keras the program has not imported: importing tf_keras would change
    the rule above."""
    if IS_KERAS_3:
        flavour_class(KERAS)
    if not IS_KERAS_3 or TF_KERAS in sys.modules:
        flavour_class(TF_KERAS)


_register_loaded_kerases()
