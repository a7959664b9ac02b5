"""``hubfast.keras.KerasLayer``: a SavedModel (or TF1 Hub module) as a Keras 3 layer.

A real ``keras.layers.Layer`` (TensorFlow backend), usable in ``keras.Sequential``,
the functional API and subclassed models, where tensorflow_hub's layer (a
``tf_keras`` layer) is refused. Same constructor and behaviour as
``tensorflow_hub.KerasLayer`` (0.16.1) otherwise; the shared parts are in
:mod:`hubfast.keras_common`. ``hubfast.KerasLayer`` builds one of these when the
program uses Keras 3 (see :mod:`hubfast.keras_layer`).

Weights are the SavedModel's own ``tf.Variable`` objects, never copies: with
``trainable=True`` the optimizer updates the very variables that the loaded
object's functions read, so ``layer.resolved_object`` (and a re-export of it
with ``tf.saved_model.save``) sees the fine-tuned values, and a model's weights
are held in memory once. Keras 3 only tracks ``keras.Variable`` objects; each
``tf.Variable`` is wrapped in a ``keras.Variable`` whose storage *is* that
``tf.Variable`` (see :class:`_SharedVariable`).

This module imports TensorFlow and Keras 3.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import keras as _keras
import tensorflow as tf

from .keras_common import (_HubLayerMixin, _convert_python_inputs, _is_shape, _map_shapes,
                           _to_tensor_specs, _trace_output_specs)

__all__ = ["KerasLayer", "KERAS_VERSION"]

KERAS_VERSION = str(_keras.version())
if not KERAS_VERSION.startswith("3."):
    raise ImportError(f"hubfast.keras needs Keras 3; the installed keras is {KERAS_VERSION} "
                      "(use hubfast.tf_keras.KerasLayer)")


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

    _hub_symbolic_types = (_keras.KerasTensor, _keras.Variable)

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
        inputs = _convert_python_inputs(inputs, self._hub_symbolic_types)
        return super().__call__(inputs, *args, **kwargs)

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
        specs = _trace_output_specs(self, _to_tensor_specs(inputs, self._hub_symbolic_types),
                                    training)

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
