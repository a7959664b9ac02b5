"""TF1 Hub format module specs: ``create_module_spec``, ``add_signature``,
``load_module_spec`` and the writer behind ``Module.export``.

A :class:`ModuleSpec` is a list of graph variants, each a ``MetaGraphDef``
(its tags, its graph, its collections and its signatures as ``SignatureDef``
protos), plus optionally the checkpoint holding the variables' values. On
disk it is a TF1 SavedModel with one MetaGraph per variant, one checkpoint
shared by all variants, and ``tfhub_module.pb`` (a ``ModuleDef`` proto,
``format = FORMAT_V3``). tensorflow_hub itself is not needed.

This module imports TensorFlow; ``import hubfast`` does not import it.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Tuple, Union)

import tensorflow as tf
from tensorflow.core.framework import variable_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow.python.framework import op_def_registry

from . import paths

logger = logging.getLogger("hubfast")

__all__ = ["ModuleSpec", "ParsedTensorInfo", "add_signature", "attach_message",
           "create_module_spec", "create_module_spec_from_saved_model",
           "find_signature_inputs_from_multivalued_ops", "load_module_spec"]

v1 = tf.compat.v1

#: The content of ``tfhub_module.pb``: ModuleDef{format: FORMAT_V3} on the wire.
MODULE_DEF_BYTES = b"\x08\x03"
MODULE_DEF_FILENAME = "tfhub_module.pb"
_FORMAT_V3 = 3

# Collections never copied into a spec's graphs (a Saver object cannot be serialised,
# and the spec carries its own saver_def).
_ALWAYS_DROPPED = ("savers",)

#: Where ModuleAttachment protos (attach_message) are kept in a graph variant, as in
#: tensorflow_hub's modules.
ATTACHMENTS_COLLECTION = "hub_module_attachments"

#: The graph collections a module keeps and hub.Module restores; create_module_spec rejects
#: any other (drop_collections= leaves them out).
SUPPORTED_COLLECTIONS = frozenset([
    v1.GraphKeys.GLOBAL_VARIABLES, v1.GraphKeys.LOCAL_VARIABLES,
    v1.GraphKeys.TRAINABLE_VARIABLES, v1.GraphKeys.MODEL_VARIABLES,
    v1.GraphKeys.TABLE_INITIALIZERS, v1.GraphKeys.UPDATE_OPS,
    v1.GraphKeys.REGULARIZATION_LOSSES, v1.GraphKeys.ASSET_FILEPATHS,
    v1.GraphKeys.COND_CONTEXT, v1.GraphKeys.WHILE_CONTEXT, ATTACHMENTS_COLLECTION,
])

_RESOURCE = tf.resource.as_datatype_enum

#: The prefix of a colocation group in an op's ``_class`` attribute: ``b"loc:@<op name>"``.
COLOCATION_PREFIX = b"loc:@"


def is_state_node(node: Any) -> bool:
    """A NodeDef that owns state: stateful, no inputs, outputs a resource or a ref (variables,
    tables, queues). hub.Module creates these once per Module, not per application."""
    if node.input and any(not i.startswith("^") for i in node.input):
        return False
    try:
        op_def = op_def_registry.get(node.op)
    except Exception:  # noqa: BLE001 - unknown op: not ours to judge
        op_def = None
    if op_def is None or not op_def.is_stateful or op_def.input_arg:
        return False
    return any(a.is_ref or a.type == _RESOURCE for a in op_def.output_arg)


def colocation_targets(node: Any) -> List[str]:
    """The op names a NodeDef is colocated with (its ``_class`` attribute)."""
    if "_class" not in node.attr:
        return []
    return [s[len(COLOCATION_PREFIX):].decode("utf-8") for s in node.attr["_class"].list.s
            if s.startswith(COLOCATION_PREFIX)]


TensorOrDict = Union[tf.Tensor, tf.SparseTensor, Mapping[str, Any], None]


class ParsedTensorInfo:
    """What a signature input or output is: dtype, static shape, sparse or dense."""

    def __init__(self, dtype: tf.DType, shape: tf.TensorShape, is_sparse: bool,
                 type_spec: Optional[tf.TypeSpec] = None) -> None:
        self._dtype = dtype
        self._shape = shape
        self._is_sparse = is_sparse
        self._type_spec = type_spec

    @property
    def type_spec(self) -> Optional[tf.TypeSpec]:
        """The TypeSpec of a composite tensor (RaggedTensor); None for dense and sparse."""
        return self._type_spec

    @property
    def is_composite(self) -> bool:
        return self._type_spec is not None

    @property
    def dtype(self) -> tf.DType:
        return self._dtype

    @property
    def is_sparse(self) -> bool:
        return self._is_sparse

    def get_shape(self) -> tf.TensorShape:
        return self._shape

    def __repr__(self) -> str:
        return (f"<hubfast.ParsedTensorInfo shape={self._shape} dtype={self._dtype.name} "
                f"is_sparse={self._is_sparse}>")

    @classmethod
    def from_proto(cls, info: meta_graph_pb2.TensorInfo) -> "ParsedTensorInfo":
        encoding = info.WhichOneof("encoding")
        if encoding == "composite_tensor":
            spec = _decode_type_spec(info.composite_tensor.type_spec)
            return cls(spec.dtype, spec.shape, False, spec)
        if encoding not in ("name", "coo_sparse"):
            raise ValueError(f"signature tensors encoded as {encoding!r} are not supported "
                             "by hub.Module (dense, sparse and ragged are)")
        return cls(tf.as_dtype(info.dtype), tf.TensorShape(info.tensor_shape),
                   encoding == "coo_sparse")


def _decode_type_spec(proto: Any) -> tf.TypeSpec:
    # TensorFlow's own decoder of TypeSpecProto (not exported under tf.*).
    from tensorflow.core.protobuf import struct_pb2  # pylint: disable=import-outside-toplevel
    from tensorflow.python.saved_model import nested_structure_coder  # pylint: disable=import-outside-toplevel

    spec = nested_structure_coder.decode_proto(struct_pb2.StructuredValue(type_spec_value=proto))
    if not isinstance(spec, tf.RaggedTensorSpec):
        raise ValueError(f"signature tensors of type {type(spec).__name__} are not supported "
                         "by hub.Module (dense, sparse and ragged are)")
    return spec


def tensor_names(info: meta_graph_pb2.TensorInfo) -> List[str]:
    """The graph tensors behind a TensorInfo: [name] or [indices, values, dense_shape]."""
    encoding = info.WhichOneof("encoding")
    if encoding == "coo_sparse":
        c = info.coo_sparse
        return [c.indices_tensor_name, c.values_tensor_name, c.dense_shape_tensor_name]
    if encoding == "composite_tensor":
        return [c.name for c in info.composite_tensor.components]
    return [info.name]


def _parse_info_map(infos: Mapping[str, meta_graph_pb2.TensorInfo]) -> Dict[str, ParsedTensorInfo]:
    return {k: ParsedTensorInfo.from_proto(v) for k, v in sorted(infos.items())}


class Variant:
    """One graph variant of a module: its tags and its MetaGraphDef (not to be mutated)."""

    def __init__(self, tags: Iterable[str], meta_graph: meta_graph_pb2.MetaGraphDef) -> None:
        self.tags = frozenset(tags)
        self.meta_graph = meta_graph
        self.cache: Dict[str, Any] = {}  # graph indexes built by hubfast.module_v1, shared

    def variable_defs(self, collection: str = "variables") -> List[variable_pb2.VariableDef]:
        out = []
        col = self.meta_graph.collection_def.get(collection)
        if col is not None:
            for raw in col.bytes_list.value:
                vd = variable_pb2.VariableDef()
                vd.ParseFromString(raw)
                out.append(vd)
        return out

    def node_list(self, collection: str) -> List[str]:
        col = self.meta_graph.collection_def.get(collection)
        return list(col.node_list.value) if col is not None else []


def _tags_str(tags: Iterable[str]) -> str:
    return "{" + ", ".join(repr(t) for t in sorted(tags)) + "}" if tags else "set()"


class ModuleSpec:
    """The definition of a TF1 Hub format module (``hub.ModuleSpec``).

    Made by :func:`create_module_spec` (in memory: variables start from their
    initializers) or :func:`load_module_spec` (variables start from the
    module's checkpoint). Instantiate it with ``hubfast.module_v1.Module(spec)``.
    """

    def __init__(self, variants: Sequence[Variant], checkpoint_prefix: Optional[str] = None,
                 source: Optional[str] = None) -> None:
        if not variants:
            raise ValueError("a module needs at least one graph variant")
        seen = set()
        for v in variants:
            if v.tags in seen:
                raise ValueError(f"two graph variants have the tags {_tags_str(v.tags)}")
            seen.add(v.tags)
        self._variants = list(variants)
        self._checkpoint_prefix = checkpoint_prefix
        self._source = source

    def __repr__(self) -> str:
        where = self._source or "in memory"
        return f"<hubfast.ModuleSpec {where} tags={[_tags_str(t) for t in self.get_tags()]}>"

    # Introspection --------------------------------------------------------------------------

    def get_tags(self) -> List[set]:
        """The tag sets of the graph variants, e.g. ``[set(), {"train"}]``."""
        return [set(v.tags) for v in self._variants]

    def variant(self, tags: Optional[Iterable[str]] = None) -> Variant:
        """The graph variant with exactly `tags` (None: the empty set)."""
        if isinstance(tags, str):
            raise TypeError(f"tags must be a set of strings, not the string {tags!r}")
        wanted = frozenset(tags or ())
        for v in self._variants:
            if v.tags == wanted:
                return v
        raise ValueError(f"the module has no graph variant with tags {_tags_str(wanted)}; "
                         f"available: {[_tags_str(v.tags) for v in self._variants]}")

    def _signature_def(self, signature: Optional[str], tags: Optional[Iterable[str]]
                       ) -> meta_graph_pb2.SignatureDef:
        signature = signature or "default"
        sigs = self.variant(tags).meta_graph.signature_def
        if signature not in sigs:
            raise KeyError(f"signature {signature!r} is missing; the module has "
                           f"{sorted(sigs)}")
        return sigs[signature]

    def get_signature_names(self, tags: Optional[Iterable[str]] = None) -> List[str]:
        return sorted(self.variant(tags).meta_graph.signature_def)

    def get_input_info_dict(self, signature: Optional[str] = None,
                            tags: Optional[Iterable[str]] = None) -> Dict[str, ParsedTensorInfo]:
        return _parse_info_map(self._signature_def(signature, tags).inputs)

    def get_output_info_dict(self, signature: Optional[str] = None,
                             tags: Optional[Iterable[str]] = None) -> Dict[str, ParsedTensorInfo]:
        return _parse_info_map(self._signature_def(signature, tags).outputs)

    def get_attached_message(self, key: str, message_type: Any, tags: Optional[Iterable[str]] = None,
                             required: bool = False) -> Any:
        """The message that ``module_fn`` attached under `key` (:func:`attach_message`) in the
        graph variant `tags`, parsed as `message_type`; None (or KeyError if `required`)
        when there is none."""
        col = self.variant(tags).meta_graph.collection_def.get(ATTACHMENTS_COLLECTION)
        found = None
        for raw in (col.bytes_list.value if col is not None else []):
            fields = dict(_proto_fields(raw))
            if fields.get(1, b"").decode("utf-8") == key:
                found = fields.get(2, b"")
        if found is None:
            if required:
                raise KeyError(f"the module has no attached message {key!r}")
            return None
        message = message_type()
        message.ParseFromString(found)
        return message

    # Export ---------------------------------------------------------------------------------

    def export(self, path: Union[str, "os.PathLike[str]"], _sentinel: Any = None,
               checkpoint_path: Optional[str] = None,
               name_transform_fn: Optional[Callable[[str], str]] = None) -> None:
        """Writes the module to `path`, variables taken from a checkpoint.

        Args:
          checkpoint_path: a checkpoint prefix; default: the module's own checkpoint
            (a spec from :func:`load_module_spec`).
          name_transform_fn: maps a module variable name to its key in the checkpoint
            (e.g. ``lambda n: "module/" + n`` for a checkpoint of a consumer graph).
        """
        if _sentinel is not None:
            raise ValueError("export() takes checkpoint_path as a keyword argument")
        checkpoint_path = checkpoint_path or self._checkpoint_prefix
        names = sorted({vd.variable_name.split(":")[0]
                        for v in self._variants for vd in v.variable_defs()})
        values: Dict[str, Any] = {}
        if names:
            if not checkpoint_path:
                raise ValueError("this spec has no checkpoint: pass checkpoint_path=, or "
                                 "use Module(spec).export(path, session)")
            reader = tf.train.load_checkpoint(checkpoint_path)
            shapes = reader.get_variable_to_shape_map()
            want = {vd.variable_name.split(":")[0]: vd for v in self._variants
                    for vd in v.variable_defs()}
            for n in names:
                key = name_transform_fn(n) if name_transform_fn else n
                if key not in shapes:
                    raise ValueError(f"cannot export: the module's variable {n!r} is read "
                                     f"from {key}, but {key} is not found in "
                                     f"{checkpoint_path}")
                shape = self._variable_shape(n)
                if shape is not None and not shape.is_compatible_with(shapes[key]):
                    raise ValueError(f"cannot export: the shape {shapes[key]} of {key} in "
                                     f"{checkpoint_path} doesn't match with shape of "
                                     f"the module's variable {n!r}: {shape}")
                values[n] = reader.get_tensor(key)
        write_module(self._variants, path, values)


    def _variable_shape(self, name: str) -> Optional[tf.TensorShape]:
        for v in self._variants:
            for node in v.meta_graph.graph_def.node:
                if node.name == name and "shape" in node.attr:
                    return tf.TensorShape(node.attr["shape"].shape)
        return None


# ---------------------------------------------------------------------------------------------
# create_module_spec / add_signature
# ---------------------------------------------------------------------------------------------

_local = threading.local()


class _SignatureCollector:
    def __init__(self, graph: tf.Graph) -> None:
        self.graph = graph
        self.signatures: Dict[str, meta_graph_pb2.SignatureDef] = {}
        self.attachments: Dict[str, bytes] = {}


def _collector(what: str) -> _SignatureCollector:
    stack = getattr(_local, "stack", None)
    if not stack:
        raise RuntimeError(f"{what}() must be called by the module_fn passed to "
                           "create_module_spec()")
    collector = stack[-1]
    if v1.get_default_graph() is not collector.graph:
        raise RuntimeError(f"{what}() was called outside the graph of module_fn")
    return collector


def _encode_attachment(key: str, value: bytes) -> bytes:
    """ModuleAttachment{string key = 1; bytes value = 2} (tensorflow_hub's wire format)."""
    def field(num: int, payload: bytes) -> bytes:
        n, length = len(payload), b""
        while True:
            b = n & 0x7F
            n >>= 7
            length += bytes([b | 0x80 if n else b])
            if not n:
                break
        return bytes([num << 3 | 2]) + length + payload
    return field(1, key.encode("utf-8")) + field(2, value)


def attach_message(key: str, message: Any) -> None:
    """Attaches a protocol message to the module being defined (call it inside ``module_fn``);
    read it back with ``ModuleSpec.get_attached_message``. A later call with the same key
    replaces the message."""
    collector = _collector("attach_message")
    if not isinstance(key, str) or not key:
        raise ValueError(f"attach_message: the key must be a non-empty string, got {key!r}")
    collector.attachments[key] = message.SerializeToString()


def _as_dict(value: TensorOrDict, what: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    return {"default": value}


def _check_input_colocation(key: str, t: Any, signature: str) -> None:
    """A signature input is replaced by the caller's tensor when the module is applied, so it
    cannot carry colocation constraints of its own (ops colocated *with* it are fine: they
    follow the caller's tensor)."""
    for c in tf.nest.flatten(t, expand_composites=True):
        groups = c.op.colocation_groups()
        if groups != [COLOCATION_PREFIX + c.op.name.encode("utf-8")]:
            raise ValueError(
                f"add_signature: input {key!r} of signature {signature!r} ({c.name}) must not "
                "be placed by tf.colocate_with() in module_fn, but it is colocated with "
                f"{groups}; create the input outside any colocate_with() block")


def _label_components(key: str, t: Any) -> List[Tuple[str, Any]]:
    if isinstance(t, tf.SparseTensor):
        return [(f"{key}.indices", t.indices), (f"{key}.values", t.values),
                (f"{key}.dense_shape", t.dense_shape)]
    if isinstance(t, tf.Tensor):
        return [(key, t)]
    return [(f"{key}.{i}", c) for i, c in enumerate(tf.nest.flatten(t, expand_composites=True))]


def find_signature_inputs_from_multivalued_ops(inputs: Mapping[str, Any]) -> Optional[str]:
    """A warning (or None) about signature inputs that are one of several outputs of an op:
    colocation with such an op cannot be rewritten unambiguously when the module is applied
    to tensors with different placements. SparseTensor inputs are checked per component."""
    found = [(label, c) for key in sorted(inputs)
             for label, c in _label_components(key, inputs[key]) if len(c.op.outputs) > 1]
    if not found:
        return None
    return ("Signature inputs should be tensors of ops with a single output: a "
            "tf.colocate_with() on an op with several outputs may fail to apply when the "
            "module's inputs are fed from differently placed tensors.\n"
            "Affected inputs: " + ", ".join(f"{label}='{c.name}'" for label, c in found))


def _check_state_colocation(graph_def: Any, tags: Iterable[str]) -> None:
    """Variables, tables and queues are created once per hub.Module, apart from the ops of
    any application: they may be colocated only with each other."""
    state = {n.name for n in graph_def.node if is_state_node(n)}
    for node in graph_def.node:
        if node.name not in state:
            continue
        others = [t for t in colocation_targets(node) if t not in state]
        if others:
            raise ValueError(
                f"create_module_spec: the state node {node.name!r} ({node.op}) of the graph "
                f"variant {_tags_str(tags)} must not be placed by tf.colocate_with() next to "
                f"ops that hold no state, but it is colocated with "
                f"{[COLOCATION_PREFIX + t.encode('utf-8') for t in others]}")


def _build_infos(d: Dict[str, Any], what: str, graph: tf.Graph,
                 signature: Optional[str] = None) -> Dict[str, meta_graph_pb2.TensorInfo]:
    out = {}
    for key, t in d.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"add_signature: {what} keys must be non-empty strings, got {key!r}")
        if not isinstance(t, (tf.Tensor, tf.SparseTensor, tf.RaggedTensor)):
            raise ValueError(f"add_signature: {what}[{key!r}] is a {type(t).__name__}; it "
                             "should have one of the types Tensor, SparseTensor, RaggedTensor")
        if any(c.graph is not graph for c in tf.nest.flatten(t, expand_composites=True)):
            raise ValueError(f"add_signature: {what}[{key!r}] is not in the graph of module_fn")
        if what == "inputs":
            _check_input_colocation(key, t, signature or "default")
        if isinstance(t, tf.Tensor) and t.dtype._is_ref_dtype:  # pylint: disable=protected-access
            t = tf.identity(t)
        out[key] = v1.saved_model.utils.build_tensor_info(t)
    return out


def add_signature(name: Optional[str] = None, inputs: TensorOrDict = None,
                  outputs: TensorOrDict = None) -> None:
    """Adds a signature to the module being defined; call it inside ``module_fn``.

    Args:
      name: the signature's name, default ``"default"``.
      inputs: a Tensor (key ``"default"``) or a dict of Tensors (usually placeholders)
        that callers will feed.
      outputs: a Tensor (key ``"default"``) or a dict of Tensors the signature returns.
    """
    collector = _collector("add_signature")
    name = name or "default"
    if name in collector.signatures:
        raise ValueError(f"signature {name!r} was added twice")
    out_dict = _as_dict(outputs, "outputs")
    if not out_dict:
        raise ValueError(f"signature {name!r} has no outputs")
    in_dict = _as_dict(inputs, "inputs")
    collector.signatures[name] = v1.saved_model.signature_def_utils.build_signature_def(
        inputs=_build_infos(in_dict, "inputs", collector.graph, name),
        outputs=_build_infos(out_dict, "outputs", collector.graph),
        method_name=v1.saved_model.signature_constants.PREDICT_METHOD_NAME)
    warning = find_signature_inputs_from_multivalued_ops(in_dict)
    if warning:
        logger.warning("add_signature(name=%r): %s", name, warning)


def create_module_spec(module_fn: Callable[..., Any],
                       tags_and_args: Optional[Sequence[Tuple[Iterable[str],
                                                              Mapping[str, Any]]]] = None,
                       drop_collections: Optional[Iterable[str]] = None) -> ModuleSpec:
    """Builds a :class:`ModuleSpec` by calling ``module_fn(**args)`` in a fresh graph per variant.

    Args:
      module_fn: builds the module's graph with ``tf.compat.v1`` ops and placeholders,
        and calls :func:`add_signature` one or more times.
      tags_and_args: ``[(tags, args), ...]``, default ``[(set(), {})]``; e.g.
        ``[(set(), {"is_training": False}), ({"train"}, {"is_training": True})]``.
      drop_collections: graph collections not to keep in the module.
    """
    if not callable(module_fn):
        raise TypeError(f"module_fn must be callable, got {module_fn!r}")
    if tags_and_args is None:
        tags_and_args = [(set(), {})]
    drop = set(drop_collections or ()) | set(_ALWAYS_DROPPED)
    variants = []
    for entry in tags_and_args:
        tags, args = entry
        if isinstance(tags, str):
            raise TypeError(f"tags must be a set of strings, not the string {tags!r}")
        graph = tf.Graph()
        collector = _SignatureCollector(graph)
        stack = _local.__dict__.setdefault("stack", [])
        with graph.as_default():
            stack.append(collector)
            try:
                module_fn(**dict(args or {}))
            finally:
                stack.pop()
            if not collector.signatures:
                raise ValueError("No signatures present: module_fn added no signature; call "
                                 "add_signature() in it")
            saver_def = None
            if v1.global_variables() or v1.get_collection(v1.GraphKeys.SAVEABLE_OBJECTS):
                saver_def = v1.train.Saver(sharded=True, allow_empty=True).as_saver_def()
            keys = [k for k in graph.get_all_collection_keys() if k not in drop]
            meta_graph = v1.train.export_meta_graph(graph=graph, saver_def=saver_def,
                                                    collection_list=keys, clear_devices=True)
        _check_state_colocation(meta_graph.graph_def, tags)
        unsupported = sorted(set(meta_graph.collection_def) - SUPPORTED_COLLECTIONS)
        if unsupported:
            raise ValueError(f"Unsupported collections in graph: {unsupported}. A module "
                             "keeps only the collections it knows how to restore; pass "
                             f"create_module_spec(..., drop_collections={unsupported}) to "
                             "leave them out")
        if collector.attachments:
            meta_graph.collection_def[ATTACHMENTS_COLLECTION].bytes_list.value.extend(
                _encode_attachment(k, v) for k, v in sorted(collector.attachments.items()))
        for key, sig in collector.signatures.items():
            meta_graph.signature_def[key].CopyFrom(sig)
        del meta_graph.meta_info_def.tags[:]
        meta_graph.meta_info_def.tags.extend(sorted(tags))
        variants.append(Variant(tags, meta_graph))
    return ModuleSpec(variants)


# ---------------------------------------------------------------------------------------------
# load_module_spec
# ---------------------------------------------------------------------------------------------


def _varint(data: bytes, i: int) -> Tuple[int, int]:
    shift, value = 0, 0
    while i < len(data):
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i
    raise ValueError("truncated varint")


def _proto_fields(data: bytes) -> Iterator[Tuple[int, Union[int, bytes]]]:
    """(field number, value) of a serialized proto with varint and length-delimited fields
    only (ModuleDef, ModuleAttachment: too small to need generated classes)."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            yield field, value
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated field")
            yield field, data[i:i + n]
            i += n
        else:
            raise ValueError(f"unexpected wire type {wire}")


def _check_module_def(data: bytes, where: str) -> None:
    """ModuleDef{format = 1; repeated string required_features = 2}: only FORMAT_V3, and
    no required feature (FORMAT_V3 defines none yet), can be read."""
    fmt, required = 0, []
    try:
        for field, value in _proto_fields(data):
            if field == 1 and isinstance(value, int):
                fmt = value
            elif field == 2 and isinstance(value, bytes):
                required.append(value.decode("utf-8", "replace"))
    except ValueError as e:
        raise ValueError(f"{where}: {MODULE_DEF_FILENAME} does not parse ({e})") from None
    if fmt != _FORMAT_V3:
        raise ValueError(f"{where}: unsupported TF1 Hub module format {fmt} "
                         f"(expected {_FORMAT_V3})")
    if required:
        raise ValueError(f"{where}: the module requires features this reader does not "
                         f"support: {sorted(required)}")


def _patch_assets(meta_graph: meta_graph_pb2.MetaGraphDef, assets_dir: str) -> None:
    """Points the asset filename constants at the files in `assets_dir` (absolute paths).

    Assets are listed in ``asset_file_def`` or, as the TF1 Builder writes them, in the
    ``saved_model_assets`` collection. Both lists are then dropped: the constants (still in
    the ASSET_FILEPATHS collection) hold the absolute paths, which is what an export copies.
    """
    afds = list(meta_graph.asset_file_def)
    col = meta_graph.collection_def.get(v1.saved_model.constants.ASSETS_KEY)
    if col is not None:
        for any_proto in col.any_list.value:
            afd = meta_graph_pb2.AssetFileDef()
            any_proto.Unpack(afd)
            afds.append(afd)
    targets = {afd.tensor_info.name.split(":")[0]: os.path.join(assets_dir, afd.filename)
               for afd in afds}
    for node in meta_graph.graph_def.node:
        if node.name in targets and node.op == "Const":
            node.attr["value"].tensor.CopyFrom(
                tf.make_tensor_proto(targets[node.name].encode("utf-8")))
    del meta_graph.asset_file_def[:]
    if v1.saved_model.constants.ASSETS_KEY in meta_graph.collection_def:
        del meta_graph.collection_def[v1.saved_model.constants.ASSETS_KEY]


def load_module_spec(path: Union[str, "os.PathLike[str]"]) -> ModuleSpec:
    """Resolves `path` (URL, archive or directory) with hubfast and reads its module spec."""
    from . import resolvers

    handle = os.fspath(path)
    if not isinstance(handle, str):
        raise ValueError(f"Expected a string handle, got {path!r}")
    entry = resolvers.resolve_entry(handle)
    with entry.in_use() as d:
        module_def = os.path.join(d, MODULE_DEF_FILENAME)
        if not tf.io.gfile.exists(module_def):
            raise ValueError(f"{handle} is not a TF1 Hub format module (no {MODULE_DEF_FILENAME} "
                             f"in {d}): load a TF2 SavedModel with hubfast.load() or "
                             "hubfast.KerasLayer instead")
        with tf.io.gfile.GFile(module_def, "rb") as f:
            _check_module_def(f.read(), handle)
        variants, prefix = _read_saved_model(d)
    return ModuleSpec(variants, prefix, source=handle)


def _read_saved_model(d: str) -> Tuple[List[Variant], Optional[str]]:
    """The graph variants of the TF1 SavedModel in `d` (asset paths made absolute) and its
    checkpoint prefix (None without variables)."""
    saved_model = saved_model_pb2.SavedModel()
    pb = os.path.join(d, "saved_model.pb")
    if tf.io.gfile.exists(pb):
        with tf.io.gfile.GFile(pb, "rb") as f:
            saved_model.ParseFromString(f.read())
    else:
        from google.protobuf import text_format

        with tf.io.gfile.GFile(os.path.join(d, "saved_model.pbtxt"), "r") as f:
            text_format.Parse(f.read(), saved_model)
    variants = []
    for mg in saved_model.meta_graphs:
        _patch_assets(mg, os.path.join(d, "assets"))
        variants.append(Variant(mg.meta_info_def.tags, mg))
    prefix = os.path.join(d, "variables", "variables")
    return variants, prefix if tf.io.gfile.exists(prefix + ".index") else None


# A serving SavedModel's collections that a module does without: its saver (rebuilt), and its
# init ops (hub.Module initializes variables and tables itself).
_SAVED_MODEL_DROPPED = ("savers", v1.saved_model.constants.LEGACY_INIT_OP_KEY,
                        v1.saved_model.constants.MAIN_OP_KEY)


def create_module_spec_from_saved_model(saved_model_path: Union[str, "os.PathLike[str]"],
                                        drop_collections: Optional[Iterable[str]] = None
                                        ) -> ModuleSpec:
    """A :class:`ModuleSpec` from a TF1 SavedModel (e.g. written by
    ``tf.compat.v1.saved_model.Builder``): its meta graphs become the graph variants, its
    signatures the module's. Its init ops are dropped; other collections that hub.Module
    cannot restore must be named in `drop_collections` (ValueError otherwise). Exporting the
    spec writes a TF1 Hub module."""
    from . import resolvers

    handle = os.fspath(saved_model_path)
    entry = resolvers.resolve_entry(handle)
    with entry.in_use() as d:
        if not (tf.io.gfile.exists(os.path.join(d, "saved_model.pb"))
                or tf.io.gfile.exists(os.path.join(d, "saved_model.pbtxt"))):
            raise ValueError(f"{handle} contains neither saved_model.pb nor saved_model.pbtxt")
        variants, prefix = _read_saved_model(d)
    drop = set(_SAVED_MODEL_DROPPED) | set(drop_collections or ())
    for v in variants:
        if not v.meta_graph.signature_def:
            raise ValueError(f"{handle}: the meta graph with tags {_tags_str(v.tags)} has no "
                             "signatures")
        for key in drop:
            if key in v.meta_graph.collection_def:
                del v.meta_graph.collection_def[key]
        unsupported = sorted(set(v.meta_graph.collection_def) - SUPPORTED_COLLECTIONS)
        if unsupported:
            raise ValueError(f"Unsupported collections in graph: {unsupported}; pass "
                             f"drop_collections={unsupported} to leave them out")
    return ModuleSpec(variants, prefix, source=handle)


# ---------------------------------------------------------------------------------------------
# Writing a module
# ---------------------------------------------------------------------------------------------


def write_module(variants: Sequence[Variant], path: Union[str, "os.PathLike[str]"],
                 values: Mapping[str, Any]) -> str:
    """Writes `variants` as a TF1 Hub module at `path`, the variables holding `values`.

    `values` maps each module variable name (``"dense/kernel"``) to its value. The
    module is written into a temporary sibling directory and renamed into place, so
    `path` never holds half a module. `path` must not exist or be an empty directory.
    """
    path = os.path.abspath(paths.local_path(path))  # file:///abs/path too, as tensorflow_hub
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"cannot export a module to {path}: it exists and is not an "
                              "empty directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    var_sets = [{vd.variable_name.split(":")[0] for vd in v.variable_defs()} for v in variants]
    union = set().union(*var_sets)
    try:
        first = next(i for i, s in enumerate(var_sets) if s == union)
    except StopIteration:
        raise ValueError("cannot export: no graph variant holds all the module's variables "
                         "(one checkpoint serves all variants)") from None
    missing = union - set(values)
    if missing:
        raise ValueError(f"cannot export: no values for variables {sorted(missing)}")
    order = [first] + [i for i in range(len(variants)) if i != first]
    try:
        builder = v1.saved_model.Builder(tmp)
        for i in order:
            variant = variants[i]
            graph = tf.Graph()
            with graph.as_default():
                saver = v1.train.import_meta_graph(variant.meta_graph, clear_devices=True)
                assets = graph.get_collection(v1.GraphKeys.ASSET_FILEPATHS) or None
                sigs = dict(variant.meta_graph.signature_def)
                tags = sorted(variant.tags)
                if i == first:
                    with v1.Session(graph=graph) as sess:
                        for var in v1.global_variables():
                            init = var.initializer
                            sess.run(init, {init.inputs[1]: values[var.op.name]})
                        builder.add_meta_graph_and_variables(
                            sess, tags, signature_def_map=sigs, assets_collection=assets,
                            clear_devices=True, saver=saver)
                else:
                    builder.add_meta_graph(tags, signature_def_map=sigs,
                                           assets_collection=assets, clear_devices=True,
                                           saver=saver)
        builder.save()
        with open(os.path.join(tmp, MODULE_DEF_FILENAME), "wb") as f:
            f.write(MODULE_DEF_BYTES)
        if os.path.isdir(path):
            os.rmdir(path)  # empty (checked above)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported TF1 Hub module to %s", path)
    return path
