"""Feature columns over TF Hub modules: ``text_embedding_column``,
``sparse_text_embedding_column``, ``image_embedding_column`` (TF1 Hub format, applied with
:class:`hubfast.module_v1.Module`) and ``text_embedding_column_v2`` (a TF2 SavedModel, applied
with ``KerasLayer``). tensorflow_hub dropped them in 0.16; they work on TF 2.x's
``tf.feature_column`` without ``tf.estimator``: ``tf.compat.v1.feature_column.input_layer``
and the tf_keras ``DenseFeatures`` layer.

Each column is a v1 and a v2 dense column at once. Through ``input_layer`` (v1) every call
instantiates the module anew; through ``DenseFeatures`` (v2) the module is created once per
layer (``create_state``), so applications of one layer share its variables.
"""
from __future__ import annotations

import collections
from typing import Any, Dict, Optional, Sequence, Union

import tensorflow as tf
# tf.feature_column's base classes are not exported: the columns must derive from them.
from tensorflow.python.feature_column import feature_column as _fc_v1  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.feature_column import feature_column_v2 as _fc_v2  # pylint: disable=g-direct-tensorflow-import

from .image_util import get_expected_image_size, get_num_image_channels
from .module_spec import ModuleSpec, load_module_spec
from .module_v1 import Module

__all__ = ["text_embedding_column", "text_embedding_column_v2", "sparse_text_embedding_column",
           "image_embedding_column"]

_RESOURCE = "hub_module"
_COMBINERS = {"sum": tf.math.unsorted_segment_sum, "mean": tf.math.unsorted_segment_mean,
              "sqrtn": tf.math.unsorted_segment_sqrt_n}


def _as_spec(module_spec: Union[str, ModuleSpec]) -> ModuleSpec:
    return module_spec if isinstance(module_spec, ModuleSpec) else load_module_spec(module_spec)


def _output_dim(spec: ModuleSpec, what: str) -> int:
    out = spec.get_output_info_dict().get("default")
    if out is None or out.get_shape().rank != 2 or out.get_shape()[1] is None:
        raise ValueError(f"{what} module must have an output 'default' of shape "
                         f"[batch, dim] with dim known; it has {spec.get_output_info_dict()}")
    return int(out.get_shape()[1])


def _check_text_module(spec: ModuleSpec) -> int:
    inputs = spec.get_input_info_dict()
    if len(inputs) != 1:
        raise ValueError(f"A text module must have only one input; it has {sorted(inputs)}")
    info = next(iter(inputs.values()))
    shape = info.get_shape()
    if info.dtype != tf.string or info.is_sparse or shape.rank != 1 or shape[0] is not None:
        raise ValueError("A text module must have only one input, a batch of strings (dense "
                         f"tf.string of shape [None]); its input is {info}")
    return _output_dim(spec, "A text")


class _ModuleColumn(_fc_v2.DenseColumn, _fc_v1._DenseColumn):  # pylint: disable=protected-access
    """What the three TF1-module columns share: naming, state, config."""

    @property
    def _is_v2_column(self) -> bool:
        return True

    @property
    def _key_name(self) -> str:
        return self.key if isinstance(self.key, str) else self.key.name

    @property
    def name(self) -> str:
        return f"{self._key_name}_hub_module_embedding"

    @property
    def parents(self) -> list:
        return [self.key]

    @property
    def module_spec(self) -> ModuleSpec:
        return _as_spec(self.module_spec_path)

    @property
    def _variable_shape(self) -> tf.TensorShape:
        return self.variable_shape

    @property
    def _parse_example_spec(self) -> Dict[str, Any]:
        return self.parse_example_spec

    def _module(self, trainable: bool) -> Module:
        return Module(self.module_spec, trainable=self.trainable and trainable)

    # v1: input_layer
    def _transform_feature(self, inputs: Any) -> Any:
        return inputs.get(self.key)

    def _get_dense_tensor(self, inputs: Any, weight_collections: Any = None,
                          trainable: Optional[bool] = None) -> tf.Tensor:
        del weight_collections
        return self._apply(self._module(True if trainable is None else trainable),
                           inputs.get(self))

    # v2: DenseFeatures
    def transform_feature(self, transformation_cache: Any, state_manager: Any) -> Any:
        return transformation_cache.get(self.key, state_manager)

    def create_state(self, state_manager: Any) -> None:
        state_manager.add_resource(self, _RESOURCE, self._module(True))

    def get_dense_tensor(self, transformation_cache: Any, state_manager: Any) -> tf.Tensor:
        module = state_manager.get_resource(self, _RESOURCE)
        return self._apply(module, transformation_cache.get(self, state_manager))

    def get_config(self) -> Dict[str, Any]:
        if not isinstance(self.module_spec_path, str) or not isinstance(self.key, str):
            raise NotImplementedError(
                f"Can only generate a valid config for {type(self).__name__} that uses a "
                "string for module_spec_path and key (not a ModuleSpec or a column)")
        return dict(self._asdict())

    @classmethod
    def from_config(cls, config: Dict[str, Any], custom_objects: Any = None,
                    columns_by_name: Any = None) -> "_ModuleColumn":
        del custom_objects, columns_by_name
        return cls(**config)


class _TextEmbeddingColumn(
        _ModuleColumn,
        collections.namedtuple("_TextEmbeddingColumn", ("key", "module_spec_path", "trainable"))):
    """Strings of shape [batch] or [batch, 1] -> the module's embedding."""

    @property
    def parse_example_spec(self) -> Dict[str, Any]:
        return {self.key: tf.io.FixedLenFeature([1], tf.string)}

    @property
    def variable_shape(self) -> tf.TensorShape:
        return tf.TensorShape([_check_text_module(self.module_spec)])

    def _apply(self, module: Module, text: tf.Tensor) -> tf.Tensor:
        return module(tf.reshape(text, [-1]))


class _SparseTextEmbeddingColumn(
        _ModuleColumn,
        collections.namedtuple("_SparseTextEmbeddingColumn",
                               ("key", "module_spec_path", "combiner", "default_value",
                                "trainable"))):
    """A SparseTensor of strings [batch, n] -> the module's embedding of each string,
    combined per row (sum, mean, sqrtn); a row without strings gets `default_value`'s
    embedding, or zeros if `default_value` is None."""

    @property
    def parse_example_spec(self) -> Dict[str, Any]:
        return {self.key: tf.io.VarLenFeature(tf.string)}

    @property
    def variable_shape(self) -> tf.TensorShape:
        return tf.TensorShape([_check_text_module(self.module_spec)])

    def _apply(self, module: Module, text: Any) -> tf.Tensor:
        if not isinstance(text, tf.SparseTensor):
            text = tf.sparse.from_dense(tf.convert_to_tensor(text, tf.string))
        if self.default_value is not None:
            text, _ = tf.sparse.fill_empty_rows(text, self.default_value)
        embeddings = module(text.values)
        return _COMBINERS[self.combiner](embeddings, text.indices[:, 0],
                                         num_segments=text.dense_shape[0])


class _ImageEmbeddingColumn(
        _ModuleColumn,
        collections.namedtuple("_ImageEmbeddingColumn", ("key", "module_spec_path", "image_size"))):
    """float32 images [batch, height, width, channels] in [0, 1] -> the module's features.
    Image modules are applied as they are (not fine-tuned) by this column."""

    trainable = False

    @property
    def parse_example_spec(self) -> Dict[str, Any]:
        spec = self.module_spec
        size = list(self.image_size) if self.image_size else get_expected_image_size(spec)
        return {self._key_name: tf.io.FixedLenFeature(size + [get_num_image_channels(spec)],
                                                       tf.float32)}

    @property
    def variable_shape(self) -> tf.TensorShape:
        return tf.TensorShape([_output_dim(self.module_spec, "An image")])

    def _apply(self, module: Module, images: Any) -> tf.Tensor:
        return module(tf.convert_to_tensor(images, tf.float32))


def text_embedding_column(key: str, module_spec: Union[str, ModuleSpec],
                          trainable: bool = False) -> _TextEmbeddingColumn:
    """A dense column that embeds the string feature `key` with a TF1 text module (one
    string input of shape [batch], output ``default`` of shape [batch, dim])."""
    column = _TextEmbeddingColumn(key=key, module_spec_path=module_spec, trainable=trainable)
    _check_text_module(column.module_spec)
    return column


def sparse_text_embedding_column(key: str, module_spec: Union[str, ModuleSpec], combiner: str,
                                 default_value: Optional[str],
                                 trainable: bool = False) -> _SparseTextEmbeddingColumn:
    """A dense column over the variable-length string feature `key`: each string is embedded
    with the text module, and a row's embeddings are combined by `combiner` ("sum", "mean"
    or "sqrtn"). A row without strings is embedded as `default_value` (zeros if None)."""
    if combiner not in _COMBINERS:
        raise ValueError(f"combiner must be one of {sorted(_COMBINERS)}, got {combiner!r}")
    column = _SparseTextEmbeddingColumn(key=key, module_spec_path=module_spec, combiner=combiner,
                                        default_value=default_value, trainable=trainable)
    _check_text_module(column.module_spec)
    return column


def image_embedding_column(key: Any, module_spec: Union[str, ModuleSpec],
                           image_size: Optional[Sequence[int]] = None) -> _ImageEmbeddingColumn:
    """A dense column that computes the features of the image feature `key` with a TF1 image
    module. `image_size` ([height, width]) is needed only when the module accepts any size."""
    column = _ImageEmbeddingColumn(key=key, module_spec_path=module_spec,
                                   image_size=tuple(image_size) if image_size else None)
    spec = column.module_spec
    inputs = spec.get_input_info_dict()
    if len(inputs) != 1:
        raise ValueError(f"An image module must have only one input; it has {sorted(inputs)}")
    if image_size is None:
        get_expected_image_size(spec)  # fails early, with the reason
    column.variable_shape  # pylint: disable=pointless-statement  # checks the output
    return column


class _TextEmbeddingColumnV2(
        _fc_v2.DenseColumn,
        collections.namedtuple("_TextEmbeddingColumnV2",
                               ("key", "module_path", "output_key", "trainable"))):
    """Strings -> the embedding a TF2 SavedModel computes (applied with KerasLayer; for
    tf_keras's DenseFeatures)."""

    @property
    def _is_v2_column(self) -> bool:
        return True

    @property
    def parents(self) -> list:
        return [self.key]

    @property
    def name(self) -> str:
        return f"{self.key}_hub_module_embedding"

    @property
    def parse_example_spec(self) -> Dict[str, Any]:
        return {self.key: tf.io.FixedLenFeature([1], tf.string)}

    @property
    def variable_shape(self) -> tf.TensorShape:
        # KerasLayer cannot always infer its output shape unbuilt: trace one call instead.
        layer = self._layer()
        traced = tf.function(layer).get_concrete_function(tf.TensorSpec([None], tf.string))
        return tf.TensorShape(traced.structured_outputs.shape)[1:]

    def _layer(self) -> Any:
        # DenseFeatures, the consumer of v2 columns, is a tf_keras layer (Keras 3 has none).
        from .tf_keras import KerasLayer  # pylint: disable=import-outside-toplevel

        return KerasLayer(self.module_path, trainable=self.trainable, output_key=self.output_key,
                          name=f"{self.key}_hub_module_embedding_layer")

    def create_state(self, state_manager: Any) -> None:
        state_manager.add_resource(self, _RESOURCE, self._layer())

    def transform_feature(self, transformation_cache: Any, state_manager: Any) -> Any:
        return transformation_cache.get(self.key, state_manager)

    def get_dense_tensor(self, transformation_cache: Any, state_manager: Any) -> tf.Tensor:
        text = tf.reshape(transformation_cache.get(self, state_manager), [-1])
        return state_manager.get_resource(self, _RESOURCE)(text)

    def get_config(self) -> Dict[str, Any]:
        return dict(self._asdict())

    @classmethod
    def from_config(cls, config: Dict[str, Any], custom_objects: Any = None,
                    columns_by_name: Any = None) -> "_TextEmbeddingColumnV2":
        del custom_objects, columns_by_name
        return cls(**config)


def text_embedding_column_v2(key: str, module_path: str, output_key: Optional[str] = None,
                             trainable: bool = False) -> _TextEmbeddingColumnV2:
    """A dense column that embeds the string feature `key` with a TF2 SavedModel text
    embedding (strings [batch] -> [batch, dim]), for tf_keras's ``DenseFeatures``."""
    if not isinstance(module_path, str):
        raise TypeError(f"module_path must be a handle string, got {module_path!r}")
    return _TextEmbeddingColumnV2(key=key, module_path=module_path, output_key=output_key,
                                  trainable=trainable)
