"""``hubfast.KerasLayer``: a SavedModel (or TF1 Hub module) as a Keras layer.

Same constructor and behaviour as ``tensorflow_hub.KerasLayer`` (0.16.1), with
one class name and two implementations, chosen when this module is imported:

* Keras 3 (``tf.keras`` is Keras 3: TensorFlow >= 2.16 without
  ``TF_USE_LEGACY_KERAS=1``): a real ``keras.layers.Layer``, usable in
  ``keras.Sequential``, the functional API and subclassed models, where
  tensorflow_hub's layer (a ``tf_keras`` layer) is refused.
* ``tf_keras`` (``TF_USE_LEGACY_KERAS=1``, or TensorFlow < 2.16): a
  ``tf_keras.layers.Layer``, as tensorflow_hub's.

Weights are the SavedModel's own ``tf.Variable`` objects, never copies: with
``trainable=True`` the optimizer updates the very variables that the loaded
object's functions read, so ``layer.resolved_object`` (and a re-export of it
with ``tf.saved_model.save``) sees the fine-tuned values, and a model's weights
are held in memory once. Under ``tf_keras`` they are registered with
``add_weight(getter=...)``. Keras 3 only tracks ``keras.Variable`` objects;
each ``tf.Variable`` is wrapped in a ``keras.Variable`` whose storage *is* that
``tf.Variable`` (the TensorFlow backend keeps a ``tf.Variable`` handed to
``Variable._initialize`` as its value; see :class:`_SharedVariable`).

Handles (strings or ``os.PathLike``) are loaded with :func:`hubfast.load`,
which holds the cache entry's use-lock while TensorFlow reads the files.

This module imports TensorFlow; ``hubfast`` imports it lazily, on first use
of ``hubfast.KerasLayer``.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import threading
from typing import Any, Dict, Optional

import tensorflow as tf

from . import loading

logger = logging.getLogger("hubfast")

__all__ = ["KerasLayer", "KERAS_VERSION", "IS_KERAS_3"]


def _keras_version() -> str:
    """The version of the Keras that ``tf.keras`` means in this process."""
    version_fn = getattr(tf.keras, "version", None)
    if callable(version_fn):
        return str(version_fn())
    return str(getattr(tf.keras, "__version__", "2"))


KERAS_VERSION = _keras_version()
IS_KERAS_3 = KERAS_VERSION.startswith("3.")

if IS_KERAS_3:
    import keras as _keras
else:
    try:
        import tf_keras as _keras
    except ImportError:  # TensorFlow < 2.16: tf.keras is Keras 2 itself
        _keras = tf.keras


# --------------------------------------------------------------------------
# Helpers shared by both implementations.
# --------------------------------------------------------------------------


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


def _is_tensor_like(x: Any) -> bool:
    if isinstance(x, (tf.Tensor, tf.Variable, tf.SparseTensor, tf.RaggedTensor)):
        return True
    if tf.is_tensor(x) or hasattr(x, "__array__"):
        return True
    return IS_KERAS_3 and isinstance(x, (_keras.KerasTensor, _keras.Variable))


def _convert_python_inputs(inputs: Any) -> Any:
    """Turns a (nest of) plain Python values such as ``[10., 20.]`` into one tensor.

    tf_keras accepts ``layer([10., 20.])``; Keras 3 refuses Python lists as a
    positional argument. Dicts (signature inputs) are converted value by value.
    """
    if isinstance(inputs, dict):
        return {k: _convert_python_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        leaves = tf.nest.flatten(inputs)
        if leaves and not any(_is_tensor_like(x) for x in leaves):
            return tf.convert_to_tensor(inputs)
        return inputs
    if isinstance(inputs, (bytes, str, bool, int, float)):
        return tf.convert_to_tensor(inputs)
    return inputs


class _HubLayerMixin:
    """The logic both implementations share: options, the call, the config."""

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


def _to_tensor_specs(inputs: Any) -> Any:
    """A nest of tensors / KerasTensors as a nest of ``tf.TensorSpec`` (others kept)."""
    def spec(x: Any) -> Any:
        if tf.is_tensor(x) or (IS_KERAS_3 and isinstance(x, _keras.KerasTensor)):
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
        specs = _trace_output_specs(layer, _to_tensor_specs(inputs),
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


# --------------------------------------------------------------------------
# Keras 3
# --------------------------------------------------------------------------

if IS_KERAS_3:

    class _ExistingVariable:
        """An "initializer" that hands back an existing ``tf.Variable`` (no copy)."""

        def __init__(self, variable: tf.Variable) -> None:
            self.variable = variable

        def __call__(self, shape: Any = None, dtype: Any = None) -> tf.Variable:
            return self.variable

    _AGGREGATION = {
        tf.VariableAggregation.NONE: "none",
        tf.VariableAggregation.SUM: "sum",
        tf.VariableAggregation.MEAN: "mean",
        tf.VariableAggregation.ONLY_FIRST_REPLICA: "only_first_replica",
    }
    _SYNCHRONIZATION = {
        tf.VariableSynchronization.NONE: "none",
        tf.VariableSynchronization.ON_READ: "on_read",
        tf.VariableSynchronization.ON_WRITE: "on_write",
        tf.VariableSynchronization.AUTO: "auto",
    }

    class _SharedVariable(_keras.Variable):
        """A ``keras.Variable`` whose storage is an existing ``tf.Variable``.

        The TensorFlow backend's ``Variable._initialize`` keeps a ``tf.Variable``
        it is handed as ``self._value``, without a copy; but the constructor
        only hands it one by way of ``convert_to_tensor(initializer, dtype)``,
        which passes a ``tf.Variable`` through unchanged when the dtypes agree
        and otherwise casts (a copy). This class does not depend on that: the
        variable travels as a callable initializer (:class:`_ExistingVariable`)
        and ``_initialize_with_initializer`` forwards the variable itself, not
        a call's result, to ``_initialize``. Reads, assignments and the
        optimizer's updates (``TFOptimizer`` updates ``v.value``) then all go
        to the SavedModel's variable, and ``tape.gradient`` w.r.t. this object
        is w.r.t. that variable (``handle`` is the variable's handle).
        """

        def _initialize_with_initializer(self, initializer: Any) -> None:
            if isinstance(initializer, _ExistingVariable):
                self._initialize(initializer.variable)
            else:
                super()._initialize_with_initializer(initializer)

        @property
        def source(self) -> tf.Variable:
            """The wrapped ``tf.Variable`` (the same object the SavedModel's functions use)."""
            return self._value

    def _wrap_variable(variable: tf.Variable, trainable: bool) -> "_SharedVariable":
        name = variable.name.split(":")[0].replace("/", "_") or "variable"
        shape = variable.shape
        if not shape.is_fully_defined():
            shape = tf.TensorShape(tf.shape(variable).numpy())
        wrapped = _SharedVariable(
            initializer=_ExistingVariable(variable),
            shape=tuple(shape.as_list()),
            dtype=variable.dtype.name,
            trainable=trainable,
            autocast=False,
            aggregation=_AGGREGATION.get(variable.aggregation, "none"),
            synchronization=_SYNCHRONIZATION.get(variable.synchronization, "auto"),
            name=name,
        )
        if wrapped._value is not variable:  # pylint: disable=protected-access
            # A Keras release that copies after all: refuse silently doubling memory
            # and, worse, training a copy the SavedModel's functions never read.
            raise RuntimeError(
                f"hubfast.KerasLayer: Keras {KERAS_VERSION} copied variable {variable.name} "
                "instead of wrapping it; please report this.")
        return wrapped

    @_keras.saving.register_keras_serializable(package="hubfast", name="KerasLayer")
    class KerasLayer(_HubLayerMixin, _keras.layers.Layer):
        """Wraps a SavedModel (or a legacy TF1 Hub format module) as a Keras 3 layer.

        Args:
          handle: a URL, a path (local directory or archive), an ``os.PathLike``,
            or an already loaded callable object (then ``get_config`` is refused).
          trainable: whether the SavedModel's trainable variables are trained
            (and its regularization losses added to the layer's losses).
          arguments: extra keyword arguments passed on every call.
          _sentinel: prevents further positional arguments.
          tags: MetaGraph tags to load; TF1 Hub modules default to the empty set.
          signature: call ``obj.signatures[signature]`` (with dict inputs as
            keyword arguments) instead of ``obj.__call__``.
          signature_outputs_as_dict: return the signature's whole output dict.
          output_key: return this item of a dict output.
          output_shape: output shape(s) without the batch dimension.
          load_options: a ``tf.saved_model.LoadOptions`` for loading `handle`.
          **kwargs: forwarded to ``keras.layers.Layer``.
        """

        def __init__(self, handle, trainable=False, arguments=None, _sentinel=None,  # noqa: N803
                     tags=None, signature=None, signature_outputs_as_dict=None,
                     output_key=None, output_shape=None, load_options=None, **kwargs):
            if _sentinel is not None:
                raise ValueError("KerasLayer takes `handle` as its only positional argument "
                                 "(and `trainable`, `arguments`); pass the others by keyword.")
            opts, func, fn = self._hub_prepare(handle, arguments, tags, signature,
                                               signature_outputs_as_dict, output_key,
                                               output_shape, load_options)
            batch_input_shape = _pop_input_shape(kwargs)
            super().__init__(trainable=trainable, **kwargs)
            self._hub_batch_input_shape = batch_input_shape
            self._hub_opts = opts
            self._hub_func = func  # tracked: a checkpoint dependency, as in tf_keras
            self._hub_callable = fn
            trainable_vars, other_vars = self._hub_variables()
            for v in trainable_vars:
                self._track_variable(_wrap_variable(v, trainable=True))
            for v in other_vars:
                self._track_variable(_wrap_variable(v, trainable=False))
            self.built = True

        def __call__(self, inputs, *args, **kwargs):
            return super().__call__(_convert_python_inputs(inputs), *args, **kwargs)

        @property
        def input_shape(self):
            """The ``input_shape`` given to the constructor, with the batch dimension.

            tensorflow_hub's documented idiom ``KerasLayer(h, input_shape=[],
            dtype=tf.string)`` as a Sequential's first layer: Keras 3 would give the
            Sequential a float32 ``InputLayer``; exposing the shape here makes it build
            its input from this layer's dtype instead.
            """
            if self._hub_batch_input_shape is None:
                raise AttributeError("input_shape")
            return self._hub_batch_input_shape

        def call(self, inputs, training=None):
            return self._hub_call(inputs, training)

        def _get_own_losses(self):
            # The SavedModel's regularization losses are callables, evaluated whenever
            # the losses are asked for (eagerly, or inside the train step's graph), and
            # only while the layer is trainable (as tensorflow_hub).
            losses = super()._get_own_losses()
            if self.trainable and self._hub_opts.reg_losses:
                losses.extend(tf.convert_to_tensor(loss()) for loss in self._hub_opts.reg_losses)
            return losses

        def get_config(self):
            return self._hub_config(super().get_config())

        def compute_output_shape(self, input_shape):
            static = self._hub_static_output_shape(input_shape)
            if static is not None:
                return _map_shapes_to_tuples(static)
            spec = self.compute_output_spec(_specs_for(self, input_shape))
            return tf.nest.map_structure(lambda t: tuple(t.shape), spec)

        def compute_output_spec(self, inputs, training=None, **kwargs):
            # Trace the call on placeholders in a scratch graph (as Keras' default does,
            # which is bypassed once compute_output_shape is defined), keeping the real
            # output dtypes (strings, ints, dict outputs).
            del kwargs
            if not isinstance(training, bool):
                training = None
            specs = _trace_output_specs(self, _to_tensor_specs(inputs), training)

            def to_keras(spec: Any) -> Any:
                if not isinstance(spec, tf.TensorSpec):
                    return spec
                if spec.shape.rank is None:
                    raise ValueError(
                        f"hubfast.KerasLayer({self._hub_opts.handle!r}): cannot infer the "
                        "output shape of the SavedModel's function; pass "
                        "output_shape=(...) (without the batch dimension).")
                return _keras.KerasTensor(tuple(spec.shape.as_list()), dtype=spec.dtype.name)

            return tf.nest.map_structure(to_keras, specs)

    def _pop_input_shape(kwargs: Dict[str, Any]) -> Optional[tuple]:
        """Takes Keras 2's ``input_shape`` / ``batch_input_shape`` / ``input_dim`` out of kwargs."""
        shape = None
        if kwargs.get("batch_input_shape") is not None:
            shape = tuple(kwargs["batch_input_shape"])
        elif kwargs.get("input_shape") is not None:
            shape = (None,) + tuple(kwargs["input_shape"])
        elif kwargs.get("input_dim") is not None:
            shape = (None, int(kwargs["input_dim"]))
        for key in ("batch_input_shape", "input_shape", "input_dim"):
            kwargs.pop(key, None)
        return shape

    def _map_shapes_to_tuples(shapes: Any) -> Any:
        return _map_shapes(lambda s: tuple(s.as_list()), shapes)

    def _specs_for(layer: "KerasLayer", input_shape: Any) -> Any:
        """KerasTensors for `input_shape`, typed from the callable's input signature if any."""
        dtype = layer.compute_dtype
        fn = layer._hub_callable  # pylint: disable=protected-access
        for candidate in (fn, getattr(fn, "__call__", None)):
            try:
                sig = getattr(candidate, "input_signature", None)
            except Exception:  # noqa: BLE001 - a property that cannot answer
                sig = None
            if sig and isinstance(sig[0], tf.TensorSpec):
                dtype = sig[0].dtype.name
                break
        if _is_shape(input_shape):
            return _keras.KerasTensor(tuple(input_shape), dtype=dtype)
        return tf.nest.map_structure(lambda s: _keras.KerasTensor(tuple(s), dtype=dtype),
                                     input_shape, check_types=False)

# --------------------------------------------------------------------------
# tf_keras
# --------------------------------------------------------------------------

else:

    def _register(cls):
        saving = getattr(_keras, "saving", None)
        register = getattr(saving, "register_keras_serializable", None)
        if register is None:
            register = _keras.utils.register_keras_serializable
        return register(package="hubfast", name="KerasLayer")(cls)

    @_register
    class KerasLayer(_HubLayerMixin, _keras.layers.Layer):  # type: ignore[no-redef]
        """Wraps a SavedModel (or a legacy TF1 Hub format module) as a tf_keras layer.

        Same arguments as the Keras 3 implementation (and tensorflow_hub's).
        """

        def __init__(self, handle, trainable=False, arguments=None, _sentinel=None,  # noqa: N803
                     tags=None, signature=None, signature_outputs_as_dict=None,
                     output_key=None, output_shape=None, load_options=None, **kwargs):
            if _sentinel is not None:
                raise ValueError("KerasLayer takes `handle` as its only positional argument "
                                 "(and `trainable`, `arguments`); pass the others by keyword.")
            opts, func, fn = self._hub_prepare(handle, arguments, tags, signature,
                                               signature_outputs_as_dict, output_key,
                                               output_shape, load_options)
            super().__init__(trainable=trainable, **kwargs)
            self._hub_opts = opts
            self._hub_func = func
            self._hub_callable = fn
            trainable_vars, other_vars = self._hub_variables()
            for v in trainable_vars:
                self._hub_add_existing_weight(v, trainable=True)
            for v in other_vars:
                self._hub_add_existing_weight(v, trainable=False)
            for loss in opts.reg_losses:
                self.add_loss(self._hub_loss_if_trainable(loss))

        def _hub_add_existing_weight(self, weight, trainable):
            # add_weight() registers the variable the getter returns: no new variable.
            self.add_weight(name=weight.name, shape=weight.shape, dtype=weight.dtype,
                            trainable=trainable, experimental_autocast=False,
                            getter=lambda *_, **__: weight)

        def _hub_loss_if_trainable(self, loss):
            return lambda: loss() if self.trainable else 0.0

        def _hub_default_training(self):
            return _keras.backend.learning_phase()

        def call(self, inputs, training=None):
            return self._hub_call(inputs, training)

        def get_config(self):
            return self._hub_config(super().get_config())

        def compute_output_shape(self, input_shape):
            static = self._hub_static_output_shape(input_shape)
            if static is not None:
                return static
            return super().compute_output_shape(input_shape)
