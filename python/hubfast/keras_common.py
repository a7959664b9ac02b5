"""The parts of ``hubfast.KerasLayer`` that do not depend on the Keras flavour.

Both flavours (:mod:`hubfast.keras` for Keras 3, :mod:`hubfast.tf_keras` for
tf_keras) mix :class:`_HubLayerMixin` into their Keras' ``Layer``: loading and
option checks, the call, the config, and the static output shapes. Each flavour
supplies ``_hub_symbolic_types``, the symbolic tensor and variable types of its
Keras, so that shared code recognises them without importing either Keras.

This module imports TensorFlow.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import threading
from typing import Any, Dict, Tuple

import tensorflow as tf

from . import loading

logger = logging.getLogger("hubfast")


class _Options:
    """The constructor's options, kept out of Keras' and TensorFlow's attribute tracking.

    (Both wrap dicts and lists assigned to a layer attribute in trackable
    containers, which ``json.dumps`` in ``get_config`` would then choke on.)
    """

    __slots__ = ("handle", "arguments", "tags", "signature", "signature_outputs_as_dict",
                 "output_key", "output_shape", "load_options", "is_hub_module_v1",
                 "has_training_argument", "logged_zero_weights", "reg_losses")

    def __init__(self, **kwargs: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, kwargs.get(name))


def _to_shapes(x: Any) -> Any:
    """Turns a nest of shape-like tuples/lists into a nest of ``tf.TensorShape``."""
    if isinstance(x, dict):
        return type(x)((k, _to_shapes(v)) for k, v in x.items())
    try:
        return tf.TensorShape(x)
    except (TypeError, ValueError):
        pass
    if isinstance(x, (list, tuple)):
        return type(x)(_to_shapes(v) for v in x)
    raise TypeError("output_shape must be a shape (a tuple of ints or None), or a dict, "
                    f"list or tuple of shapes; got {x!r}")


def _from_shapes(x: Any) -> Any:
    """The inverse of :func:`_to_shapes`: plain tuples, JSON-friendly."""
    if isinstance(x, tf.TensorShape):
        return tuple(x.as_list()) if x.rank is not None else None
    if isinstance(x, dict):
        return {k: _from_shapes(v) for k, v in x.items()}
    return type(x)(_from_shapes(v) for v in x)


def _map_shapes(fn: Any, shapes: Any) -> Any:
    if isinstance(shapes, tf.TensorShape):
        return fn(shapes)
    if isinstance(shapes, dict):
        return {k: _map_shapes(fn, v) for k, v in shapes.items()}
    return type(shapes)(_map_shapes(fn, v) for v in shapes)


def _load(handle: Any, tags: Any, load_options: Any) -> Any:
    """The object behind `handle`: itself when callable, else ``hubfast.load(handle)``."""
    if callable(handle):
        if tags is not None:
            raise ValueError("Passing a callable handle is mutually exclusive with setting tags.")
        if load_options is not None:
            raise ValueError(
                "Passing a callable handle is mutually exclusive with setting load_options.")
        return handle
    if isinstance(handle, os.PathLike):
        handle = os.fspath(handle)
    return loading.load(handle, tags=tags, options=load_options)


def _accepts_training(fn: Any) -> bool:
    """Whether calling `fn` accepts a ``training`` keyword (as tensorflow_hub decides it).

    Restored ``tf.function`` objects carry the argument spec they were saved
    with; signatures (concrete functions) take ``**kwargs`` only and so do not
    qualify.
    """
    if not callable(fn):
        return False
    target = fn.__call__
    try:
        from tensorflow.python.util import tf_inspect  # pylint: disable=g-direct-tensorflow-import

        spec = tf_inspect.getfullargspec(target)
        return "training" in spec.args or "training" in spec.kwonlyargs
    except Exception:  # noqa: BLE001 - fall back to the standard library
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            return False
        p = params.get("training")
        return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _is_tensor_like(x: Any, symbolic: Tuple[type, ...]) -> bool:
    if isinstance(x, (tf.Tensor, tf.Variable, tf.SparseTensor, tf.RaggedTensor)):
        return True
    if tf.is_tensor(x) or hasattr(x, "__array__"):
        return True
    return isinstance(x, symbolic)


def _convert_python_inputs(inputs: Any, symbolic: Tuple[type, ...]) -> Any:
    """Turns a (nest of) plain Python values such as ``[10., 20.]`` into one tensor.

    tf_keras accepts ``layer([10., 20.])``; Keras 3 refuses Python lists as a
    positional argument. Dicts (signature inputs) are converted value by value.
    """
    if isinstance(inputs, dict):
        return {k: _convert_python_inputs(v, symbolic) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        leaves = tf.nest.flatten(inputs)
        if leaves and not any(_is_tensor_like(x, symbolic) for x in leaves):
            return tf.convert_to_tensor(inputs)
        return inputs
    if isinstance(inputs, (bytes, str, bool, int, float)):
        return tf.convert_to_tensor(inputs)
    return inputs


class _HubLayerMixin:
    """The logic both implementations share: options, the call, the config."""

    # The symbolic tensor (and variable) types of the flavour's Keras.
    _hub_symbolic_types: Tuple[type, ...] = ()

    def _hub_prepare(self, handle: Any, arguments: Any, tags: Any, signature: Any,
                     signature_outputs_as_dict: Any, output_key: Any, output_shape: Any,
                     load_options: Any):
        """Loads the object and validates the options (before Keras' constructor runs).

        Returns ``(options, loaded object, the callable to call)``; sets no attribute, so
        that Keras' constructor runs before any attribute tracking does.
        """
        if arguments is not None and not isinstance(arguments, dict):
            raise ValueError(f"arguments must be a dict of keyword arguments, got {arguments!r}")
        if tags is not None and not isinstance(tags, (str, bytes)):
            tags = list(tags)
        opts = _Options(
            handle=os.fspath(handle) if isinstance(handle, os.PathLike) else handle,
            arguments=dict(arguments or {}),
            tags=tags,
            signature=signature,
            signature_outputs_as_dict=signature_outputs_as_dict,
            output_key=output_key,
            output_shape=_to_shapes(output_shape) if output_shape else None,
            load_options=load_options,
        )
        func = _load(opts.handle, tags, load_options)
        opts.is_hub_module_v1 = bool(getattr(func, "_is_hub_module_v1", False))
        if opts.is_hub_module_v1:  # TF1 Hub format defaults
            opts.signature = opts.signature or "default"
            if not opts.signature_outputs_as_dict:
                opts.output_key = opts.output_key or "default"
        if opts.signature and ((opts.output_key is not None)
                               == bool(opts.signature_outputs_as_dict)):
            raise ValueError("When using a signature, either output_key or "
                             "signature_outputs_as_dict=True should be set.")
        if not opts.signature and opts.signature_outputs_as_dict:
            raise ValueError("signature_outputs_as_dict is only valid if specifying "
                             "a signature (or using a legacy TF1 Hub format).")
        fn = self._hub_pick_callable(func, opts)
        opts.has_training_argument = _accepts_training(fn)
        opts.logged_zero_weights = False
        reg_losses = list(getattr(func, "regularization_losses", None) or [])
        for loss in reg_losses:
            if not callable(loss):
                raise ValueError(
                    "hub.KerasLayer(obj) expects obj.regularization_losses to be an "
                    "iterable of callables, each returning a scalar loss term.")
        opts.reg_losses = tuple(reg_losses)
        return opts, func, fn

    @staticmethod
    def _hub_pick_callable(func: Any, opts: _Options) -> Any:
        if callable(func) and not opts.signature:
            return func
        if not hasattr(func, "signatures"):
            if opts.signature:
                raise ValueError("Loaded object has no signatures.")
            raise ValueError("Loaded object is not callable and has no signatures.")
        if opts.signature is None:
            raise ValueError("Signature name has to be specified for non-callable "
                             "saved models (if not legacy TF1 Hub format).")
        if opts.signature not in func.signatures:
            raise ValueError(
                f"Unknown signature {opts.signature} in {opts.handle} "
                f"(available signatures: {list(func.signatures.keys())}).")
        f = func.signatures[opts.signature]
        if not callable(f):
            raise ValueError(
                f"Internal error: signature {opts.signature} is not callable in {opts.handle}")
        return f

    def _hub_variables(self):
        """(trainable, non-trainable) variables of the loaded object, in its order."""
        func = self._hub_func
        trainable = list(getattr(func, "trainable_variables", None) or [])
        seen = {id(v) for v in trainable}
        others = [v for v in (getattr(func, "variables", None) or []) if id(v) not in seen]
        return trainable, others

    @property
    def resolved_object(self) -> Any:
        """The object that `handle` resolved to in ``__init__`` (``hub.load``'s result)."""
        return self._hub_func

    def _hub_check_trainability(self) -> None:
        if not self.trainable:
            return
        opts = self._hub_opts
        if opts.is_hub_module_v1:
            raise ValueError("Setting hub.KerasLayer.trainable = True is unsupported when "
                             "loading from the TF1 Hub format.")
        if opts.signature:
            raise ValueError("Setting hub.KerasLayer.trainable = True is unsupported when "
                             "calling a SavedModel signature.")
        if not self.trainable_weights and not opts.logged_zero_weights:
            logger.error("hub.KerasLayer is trainable but has zero trainable weights.")
            opts.logged_zero_weights = True

    def _hub_training_value(self, training: Any) -> Any:
        """The Python bool (or bool tensor) passed as ``training`` to the callable."""
        if not self.trainable:
            return False  # like BatchNormalization: a frozen layer runs in inference mode
        if training is None:
            training = self._hub_default_training()
        return training

    def _hub_default_training(self) -> Any:
        return False

    def _hub_call(self, inputs: Any, training: Any = None) -> Any:
        self._hub_check_trainability()
        opts = self._hub_opts
        args = []
        kwargs = dict(opts.arguments)
        if opts.signature and isinstance(inputs, dict):
            kwargs.update(inputs)
        else:
            args.append(inputs)
        fn = self._hub_callable
        if not opts.has_training_argument:
            result = fn(*args, **kwargs)
        else:
            training = self._hub_training_value(training)
            if not tf.is_tensor(training):  # None, a Python or NumPy bool, 0 or 1
                training = bool(training)
                result = fn(*args, training=training, **kwargs)
            else:
                result = tf.__internal__.smart_cond.smart_cond(
                    training,
                    lambda: fn(*args, training=True, **kwargs),
                    lambda: fn(*args, training=False, **kwargs))
        if opts.output_key:
            if not isinstance(result, dict):
                raise ValueError("Specifying `output_key` is forbidden if output "
                                 f"type {type(result)} is not a dict.")
            if opts.output_key not in result:
                raise ValueError(f"KerasLayer output does not contain the output key "
                                 f"{opts.output_key} (available: {list(result.keys())}).")
            result = result[opts.output_key]
        if tf.distribute.has_strategy() and not tf.executing_eagerly():
            result = _repair_static_shapes(self, inputs, training, result)
        if opts.output_shape is not None:
            batch = tf.nest.flatten(inputs)[0].shape[:1]
            if batch.rank is None:
                batch = tf.TensorShape([None])

            def set_shape(tensor: Any, shape: tf.TensorShape) -> Any:
                tensor.set_shape(batch.concatenate(shape))
                return tensor

            tf.nest.map_structure(set_shape, result, opts.output_shape)
        return result

    def _hub_config(self, base: Dict[str, Any]) -> Dict[str, Any]:
        opts = self._hub_opts
        if not isinstance(opts.handle, str):
            # NotImplementedError, as tensorflow_hub: tf.saved_model.save() then falls back
            # to saving without a config instead of failing.
            raise NotImplementedError(
                "Can only generate a valid config for `hub.KerasLayer(handle, ...)` "
                "that uses a string `handle` (a URL or a path), so that loading the "
                "model can load the handle again. Got `type(handle)`: "
                f"{type(opts.handle)}. Pass the handle string instead of the loaded object, "
                "or save the weights only.")
        config = dict(base)
        config["handle"] = opts.handle
        if opts.output_shape is not None:
            shape = _from_shapes(opts.output_shape)
            try:
                json.dumps(shape)
            except TypeError:
                raise ValueError("hub.KerasLayer(..., output_shape=) is not json-serializable.\n"
                                 f"Got value: {shape}") from None
            config["output_shape"] = shape
        if opts.arguments:
            for key, value in opts.arguments.items():
                try:
                    json.dumps(value)
                except TypeError:
                    raise ValueError("`hub.KerasLayer(..., arguments)` contains non "
                                     f"json-serializable values in key: {key}") from None
            config["arguments"] = dict(opts.arguments)
        if opts.signature:
            config["signature"] = opts.signature
        if opts.output_key:
            config["output_key"] = opts.output_key
        if opts.signature_outputs_as_dict:
            config["signature_outputs_as_dict"] = opts.signature_outputs_as_dict
        if opts.tags is not None:  # tensorflow_hub forgets them
            config["tags"] = opts.tags
        # load_options are not saved (as tensorflow_hub): they describe the loading
        # environment (e.g. experimental_io_device), not the model.
        return config

    def _hub_static_output_shape(self, input_shape: Any) -> Any:
        """``(batch,) + output_shape`` (nest-aware) when output_shape was given, else None."""
        opts = self._hub_opts
        if opts.output_shape is None:
            return None
        first = input_shape
        while not _is_shape(first):
            if isinstance(first, dict):
                first = next(iter(first.values()), None)
            elif isinstance(first, (list, tuple)) and first:
                first = first[0]
            else:
                first = None
                break
        batch = None
        if first is not None:
            s = tf.TensorShape(first)
            batch = s[0] if s.rank else None
        return _map_shapes(lambda s: tf.TensorShape([batch]).concatenate(s), opts.output_shape)


def _to_tensor_specs(inputs: Any, symbolic: Tuple[type, ...] = ()) -> Any:
    """A nest of tensors / KerasTensors as a nest of ``tf.TensorSpec`` (others kept)."""
    def spec(x: Any) -> Any:
        if tf.is_tensor(x) or isinstance(x, symbolic):
            return tf.TensorSpec(tf.TensorShape(x.shape), tf.as_dtype(x.dtype))
        return x

    return tf.nest.map_structure(spec, inputs)


def _trace_output_specs(layer: Any, input_specs: Any, training: Any) -> Any:
    """Output ``tf.TensorSpec`` nest of ``layer._hub_call`` on placeholders of `input_specs`.

    Traced in a scratch graph; inside a ``tf.distribute`` scope on a helper
    thread: a restored function called in a strategy's cross-replica or
    replica context is wrapped so that its static output shapes are lost, and
    the scope is thread-local (reading the distributed variables there reads
    their primary copies, whose shapes are the same).
    """
    def trace() -> Any:
        with tf.__internal__.FuncGraph("hubfast_keras_layer_spec").as_default():
            def placeholder(x: Any) -> Any:
                if isinstance(x, tf.TensorSpec):
                    return tf.compat.v1.placeholder(shape=x.shape, dtype=x.dtype)
                return x

            placeholders = tf.nest.map_structure(placeholder, input_specs)
            out = layer._hub_call(placeholders, training)  # pylint: disable=protected-access
            return tf.nest.map_structure(
                lambda t: tf.TensorSpec(t.shape, t.dtype) if tf.is_tensor(t) else t, out)

    if not tf.distribute.has_strategy():
        return trace()
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = trace()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["err"] = e

    worker = threading.Thread(target=run, name="hubfast-keras-layer-spec")
    worker.start()
    worker.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


def _repair_static_shapes(layer: Any, inputs: Any, training: Any, result: Any) -> Any:
    """Under a tf.distribute strategy, graph outputs lose their static shapes
    (see :func:`_trace_output_specs`); put back what tracing outside the strategy knows,
    so that downstream layers (``Dense``) can build and run."""
    flat = [t for t in tf.nest.flatten(result) if tf.is_tensor(t)]
    if all(t.shape.rank is not None and t.shape[1:].is_fully_defined() for t in flat):
        return result
    try:
        specs = _trace_output_specs(layer, _to_tensor_specs(inputs, layer._hub_symbolic_types),
                                    training if isinstance(training, bool) else False)
        tf.nest.assert_same_structure(result, specs)
    except Exception:  # noqa: BLE001 - best effort: keep what TensorFlow inferred
        logger.debug("hubfast.KerasLayer: could not trace static output shapes", exc_info=True)
        return result

    def merge(t: Any, spec: Any) -> Any:
        if tf.is_tensor(t) and isinstance(spec, tf.TensorSpec) and spec.shape.rank is not None:
            if t.shape.is_compatible_with(spec.shape):
                t.set_shape(spec.shape)
        return t

    tf.nest.map_structure(merge, result, specs)
    return result


def _is_shape(x: Any) -> bool:
    if isinstance(x, tf.TensorShape):
        return True
    return isinstance(x, (list, tuple)) and all(d is None or isinstance(d, int) for d in x)
