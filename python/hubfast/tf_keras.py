"""``hubfast.tf_keras.KerasLayer``: a SavedModel (or TF1 Hub module) as a tf_keras layer.

The layer tensorflow_hub 0.16's ``KerasLayer`` is: a ``tf_keras.layers.Layer``
for ``tf_keras`` models (and for ``tf.keras`` when it is tf_keras:
``TF_USE_LEGACY_KERAS=1``, or TensorFlow < 2.16, where ``tf.keras`` is Keras 2
itself). The shared parts are in :mod:`hubfast.keras_common`.
``hubfast.KerasLayer`` builds one of these when the program uses tf_keras (see
:mod:`hubfast.keras_layer`).

Weights are the SavedModel's own ``tf.Variable`` objects, registered with
``add_weight(getter=...)``: no copies.

This module imports TensorFlow and tf_keras.
"""
from __future__ import annotations

import tensorflow as tf

from .keras_common import _HubLayerMixin

try:
    import tf_keras as _keras
except ImportError:  # TensorFlow < 2.16: tf.keras is Keras 2 itself
    _keras = tf.keras
    if str(getattr(_keras, "__version__", "2")).startswith("3."):
        raise ImportError("hubfast.tf_keras needs the tf_keras package "
                          "(pip install tf-keras) when tf.keras is Keras 3") from None

__all__ = ["KerasLayer"]


def _register(cls):
    saving = getattr(_keras, "saving", None)
    register = getattr(saving, "register_keras_serializable", None)
    if register is None:
        register = _keras.utils.register_keras_serializable
    return register(package="hubfast", name="KerasLayer")(cls)


@_register
class KerasLayer(_HubLayerMixin, _keras.layers.Layer):
    """Wraps a SavedModel (or a legacy TF1 Hub format module) as a tf_keras layer.

    Same arguments as :class:`hubfast.keras.KerasLayer` (and tensorflow_hub's).
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
