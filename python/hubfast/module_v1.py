"""``hub.Module``: TF1 Hub format modules in ``tf.compat.v1`` graph mode, on TF 2.x.

tensorflow_hub removed this API in 0.16.0; hubfast brings it back over its own
resolver and cache::

    import hubfast as hub
    with tf.Graph().as_default():
        m = hub.Module("https://example.org/org/module/1", trainable=True, tags={"train"})
        y = m(x)                                       # signature "default"
        out = m(dict(apples=a, oranges=o), signature="fruit_to_pet", as_dict=True)

How a module enters the consumer's graph (the design):

* State, once per ``Module``: every variable of the module's graph becomes a
  new resource variable ``<name>/<variable name>`` in the current graph
  (``variable_map``), whose initializer reads the module's checkpoint with a
  ``RestoreV2`` op (or, for a spec from :func:`create_module_spec`, runs the
  module's own initializer subgraph). Other stateful resources (lookup tables,
  queues) are imported once, with their ``shared_name`` made unique, and their
  initializers go to ``TABLE_INITIALIZERS``.
* Each application (``m(x)``) imports only the part of the module graph that
  the signature's outputs need, with ``import_graph_def`` and an ``input_map``
  that feeds the caller's tensors into the signature's inputs and replaces
  every variable handle (and every table) of the module graph by the state
  created above. Variable ops are never imported again, so all applications
  read and train the same variables and no variable is created by a call.
"""
from __future__ import annotations

import contextlib
import logging
import os
import weakref
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.core.framework import attr_value_pb2

from .module_spec import (COLOCATION_PREFIX, ModuleSpec, ParsedTensorInfo, Variant, add_signature,
                          attach_message, colocation_targets, create_module_spec,
                          create_module_spec_from_saved_model, is_state_node, load_module_spec,
                          tensor_names, write_module)

logger = logging.getLogger("hubfast")

__all__ = ["Module", "ModuleSpec", "ParsedTensorInfo", "LatestModuleExporter", "add_signature",
           "attach_message", "create_module_spec_from_saved_model", "register_module_for_export",
           "export_registered_modules", "create_module_spec", "load_module_spec", "eval_function_for_module"]

v1 = tf.compat.v1

def _op_name(tensor_name: str) -> str:
    return tensor_name[1:] if tensor_name.startswith("^") else tensor_name.split(":")[0]


def _canonical(tensor_name: str) -> str:
    return tensor_name if ":" in tensor_name else tensor_name + ":0"


class _GraphIndex:
    """The module graph of one variant, indexed for pruning (shared by all Modules of a spec)."""

    def __init__(self, variant: Variant) -> None:
        mg = variant.meta_graph
        self.graph_def = mg.graph_def
        self.nodes = {n.name: n for n in self.graph_def.node}
        self.state = {n.name for n in self.graph_def.node if is_state_node(n)}
        self.global_vars = variant.variable_defs("variables")
        self.local_vars = variant.variable_defs("local_variables")
        self.trainable = {vd.variable_name.split(":")[0]
                          for vd in variant.variable_defs("trainable_variables")}
        self.var_ops = {vd.variable_name.split(":")[0] for vd in self.global_vars + self.local_vars}
        self.table_initializers = variant.node_list(v1.GraphKeys.TABLE_INITIALIZERS)
        self.regularization_losses = variant.node_list(v1.GraphKeys.REGULARIZATION_LOSSES)
        self.update_ops = [_op_name(n) for n in variant.node_list(v1.GraphKeys.UPDATE_OPS)]
        # The asset filename constants (absolute paths once loaded), re-collected in the
        # consumer's graph: a module or SavedModel exported from there copies the files.
        self.asset_paths = [_canonical(n)
                            for n in variant.node_list(v1.GraphKeys.ASSET_FILEPATHS)
                            if _op_name(n) in self.nodes]

    @classmethod
    def of(cls, variant: Variant) -> "_GraphIndex":
        if "index" not in variant.cache:
            variant.cache["index"] = cls(variant)
        return variant.cache["index"]

    def prune(self, fetch_tensors: List[str], fetch_ops: List[str], cut: Set[str]
              ) -> Tuple[graph_pb2.GraphDef, Set[str]]:
        """The nodes `fetch_*` depend on, not looking past the tensors in `cut` (which the
        caller maps with input_map). Returns the GraphDef and the cut tensors it uses."""
        keep: Set[str] = set()
        used: Set[str] = set()
        stack = [_op_name(t) for t in fetch_tensors if _canonical(t) not in cut] + list(fetch_ops)
        while stack:
            name = stack.pop()
            if name in keep:
                continue
            if name not in self.nodes:
                raise ValueError(f"the module graph has no node {name!r}")
            if name in self.state:
                raise ValueError(f"cannot import state node {name!r} of the module graph here")
            keep.add(name)
            for inp in self.nodes[name].input:
                if inp.startswith("^"):
                    src = inp[1:]
                    if src not in self.state and not any(_op_name(c) == src for c in cut):
                        stack.append(src)
                    continue
                t = _canonical(inp)
                if t in cut:
                    used.add(t)
                else:
                    stack.append(_op_name(t))
        gd = graph_pb2.GraphDef()
        gd.versions.CopyFrom(self.graph_def.versions)
        gd.library.CopyFrom(self.graph_def.library)
        for node in self.graph_def.node:
            if node.name not in keep:
                continue
            new = gd.node.add()
            new.CopyFrom(node)
            new.device = ""
            kept_inputs = [i for i in node.input if not i.startswith("^") or i[1:] in keep]
            del new.input[:]
            new.input.extend(kept_inputs)
            if "_class" in new.attr:
                locs = [s for s in new.attr["_class"].list.s
                        if not s.startswith(b"loc:@") or s[5:].decode() in keep]
                if locs:
                    del new.attr["_class"].list.s[:]
                    new.attr["_class"].list.s.extend(locs)
                else:
                    del new.attr["_class"]
        return gd, used


def _is_wrapped_graph() -> bool:
    """Tracing tf.compat.v1.wrap_function from eager code (its FuncGraph's name is all that
    tells it). From a TF1 graph, state goes to that graph as for tf.function."""
    graph = v1.get_default_graph()
    if not (tf.inside_function() and str(getattr(graph, "name", "")).startswith(
            "wrapped_function")):
        return False
    with tf.init_scope():
        return tf.executing_eagerly()


# Variables made by _wrapped_graph_variable, kept alive as long as their graph.
_GRAPH_VARIABLES: "weakref.WeakKeyDictionary[tf.Graph, List[tf.Variable]]" = (
    weakref.WeakKeyDictionary())


def _wrapped_graph_variable(name: str, dtype: tf.DType, shape: tf.TensorShape,
                            init_fn: Callable[[], tf.Tensor], trainable: bool,
                            collection: str) -> tf.Variable:
    """A resource variable whose ops live in the graph of tf.compat.v1.wrap_function, with
    its initializer there (run by the caller's ``global_variables_initializer()``, pruned
    out of the wrapped function). tf.Variable would create it eagerly instead."""
    from tensorflow.core.framework import variable_pb2  # pylint: disable=import-outside-toplevel
    from tensorflow.python.ops import resource_variable_ops  # pylint: disable=import-outside-toplevel

    graph = v1.get_default_graph()
    with v1.name_scope(name) as scope:
        handle = tf.raw_ops.VarHandleOp(dtype=dtype, shape=shape, shared_name=scope[:-1],
                                        name=scope[:-1].rsplit("/", 1)[-1])
    with v1.name_scope(scope):
        initial = init_fn()
        assign = tf.raw_ops.AssignVariableOp(resource=handle, value=initial, name="Assign")
        read = tf.raw_ops.ReadVariableOp(resource=handle, dtype=dtype, name="Read")
    vd = variable_pb2.VariableDef(
        variable_name=handle.name, initializer_name=assign.name, snapshot_name=read.name,
        initial_value_name=initial.name, is_resource=True, trainable=trainable)
    var = resource_variable_ops.ResourceVariable(variable_def=vd)
    v1.add_to_collection(collection, var)
    if trainable:
        v1.add_to_collection(v1.GraphKeys.TRAINABLE_VARIABLES, var)
    # The wrapped function refers to the variable weakly: the graph (which lives as long as
    # the function) keeps it alive.
    _GRAPH_VARIABLES.setdefault(graph, []).append(var)
    return var


def _eager_safe(fn: Callable[[], tf.Tensor]) -> Callable[[], tf.Tensor]:
    """`fn` builds graph ops (import_graph_def); called eagerly, it runs as a one-off
    wrapped function and returns its value."""
    def call() -> tf.Tensor:
        if tf.executing_eagerly():
            return v1.wrap_function(fn, [])()
        return fn()
    return call


def _check_graph_mode(what: str) -> tf.Graph:
    if tf.executing_eagerly():
        raise RuntimeError(
            f"{what} needs a graph: build it inside `with tf.Graph().as_default():`, a "
            "tf.compat.v1.wrap_function or a tf.function; or load the module with "
            "hubfast.load(handle) (its .signatures) or hubfast.KerasLayer.")
    return v1.get_default_graph()


class Module:
    """A TF1 Hub format module instantiated in the current graph (``hub.Module``).

    Args:
      spec: a :class:`ModuleSpec`, or a handle (URL, archive, directory) resolved by hubfast.
      trainable: make the module's trainable variables trainable, and add its
        REGULARIZATION_LOSSES to the graph's collection (fine-tuning).
      name: the name scope of the module's variables (made unique in the graph).
      tags: the graph variant to use; default the empty set, ``{"train"}`` for training.
    """

    def __init__(self, spec: Union[ModuleSpec, str, "os.PathLike[str]"], trainable: bool = False,
                 name: str = "module", tags: Optional[Any] = None) -> None:
        self._graph = _check_graph_mode("hub.Module")
        if not isinstance(spec, ModuleSpec):
            spec = load_module_spec(spec)
        self._spec = spec
        self._trainable = bool(trainable)
        self._tags = frozenset(tags or ())
        self._variant = spec.variant(self._tags)
        if self._trainable and "train" not in self._tags and any(
                "train" in t for t in spec.get_tags()):
            logger.warning("hub.Module(trainable=True) uses the graph variant %s; the module "
                           "has a {'train'} variant, usually the one to fine-tune",
                           sorted(self._tags))
        self._index = _GraphIndex.of(self._variant)
        self._apply_cache: Dict[str, Tuple[graph_pb2.GraphDef, Set[str], List[str]]] = {}
        with v1.name_scope(name) as scope:
            self._scope = scope  # e.g. "module/" or "module_1/"
        self._name = scope[:-1]
        self._variable_map: Dict[str, tf.Variable] = {}
        self._partitions: Set[str] = set()  # full names of partitioned variables
        self._state: Dict[str, tf.Tensor] = {}  # module tensor name -> tensor in this graph
        with self._graph.as_default(), v1.name_scope(self._scope):
            self._create_state()
            if self._trainable:
                self._import_regularization_losses()

    # State ----------------------------------------------------------------------------------

    def _create_state(self) -> None:
        idx = self._index
        # Tables, queues: imported once, each with a shared_name of its own.
        others = sorted(idx.state - idx.var_ops)
        if others:
            gd = graph_pb2.GraphDef()
            gd.versions.CopyFrom(idx.graph_def.versions)
            for n in others:
                node = gd.node.add()
                node.CopyFrom(idx.nodes[n])
                node.device = ""
                del node.input[:]
                if "shared_name" in node.attr and node.attr["shared_name"].s:
                    node.attr["shared_name"].s = (self._scope + node.name).encode()
            outs = tf.graph_util.import_graph_def(
                gd, return_elements=[n + ":0" for n in others], name=self._scope)
            self._state.update({n + ":0": t for n, t in zip(others, outs)})

        ckpt = self._spec._checkpoint_prefix  # pylint: disable=protected-access
        in_ckpt = {}
        if ckpt is not None:
            in_ckpt = dict(tf.train.list_variables(ckpt))
        all_vars = [(vd, True) for vd in idx.global_vars] + [(vd, False) for vd in idx.local_vars]
        # A partitioned variable's parts are saved as slices of one checkpoint key.
        slices: Dict[str, Tuple[str, str]] = {}
        for vd, _ in all_vars:
            if vd.HasField("save_slice_info_def"):
                info = v1.Variable.SaveSliceInfo(save_slice_info_def=vd.save_slice_info_def)
                slices[vd.variable_name.split(":")[0]] = (info.full_name, info.spec)
        self._partitions = {full for full, _ in slices.values()}

        def ckpt_key(name: str) -> str:
            return slices[name][0] if name in slices else name

        needs_init = [vd for vd, is_global in all_vars
                      if not (is_global and ckpt_key(vd.variable_name.split(":")[0]) in in_ckpt)]
        initial: Dict[str, Callable[[], tf.Tensor]] = {}
        if needs_init:
            initial = self._initial_value_fns(needs_init)
        for vd, is_global in all_vars:
            name = vd.variable_name.split(":")[0]
            node = idx.nodes[name]
            dtype = tf.as_dtype(node.attr["dtype"].type).base_dtype
            shape = tf.TensorShape(node.attr["shape"].shape)
            if name in initial:
                init_fn: Callable[[], tf.Tensor] = initial[name]
            else:
                def init_fn(key=ckpt_key(name), spec=slices.get(name, ("", ""))[1],
                            dtype=dtype, shape=shape):
                    t = tf.raw_ops.RestoreV2(prefix=ckpt, tensor_names=[key],
                                             shape_and_slices=[spec], dtypes=[dtype])[0]
                    t.set_shape(shape)
                    return t
            # Inside a function (tf.function, Defun, wrap_function) the variables live outside
            # it, created once: in the outer graph, or eagerly (then initialized at once).
            trainable = self._trainable and name in idx.trainable
            collection = (v1.GraphKeys.GLOBAL_VARIABLES if is_global
                          else v1.GraphKeys.LOCAL_VARIABLES)
            if _is_wrapped_graph():
                var = _wrapped_graph_variable(name, dtype, shape, init_fn, trainable, collection)
            else:
                # Inside tf.function or Defun the variables live outside it, created once: in
                # the outer graph, or eagerly (then initialized at once).
                lift = tf.init_scope() if tf.inside_function() else contextlib.nullcontext()
                with lift, self._colocated_with_state(node):
                    var = v1.Variable(
                        initial_value=_eager_safe(init_fn), name=name, dtype=dtype, shape=shape,
                        use_resource=True, trainable=trainable, collections=[collection])
            self._variable_map[name] = var
            self._state[name + ":0"] = var  # resolved per import (handle or value)

        if idx.table_initializers or idx.asset_paths:
            gd, used = idx.prune(idx.asset_paths, idx.table_initializers, set(self._state))
            got = tf.graph_util.import_graph_def(
                gd, input_map=self._input_map_for(used),
                return_elements=idx.table_initializers + idx.asset_paths,
                name=self._scope + "init_tables/")
            n = len(idx.table_initializers)
            for op in got[:n]:
                v1.add_to_collection(v1.GraphKeys.TABLE_INITIALIZERS, op)
            for t in got[n:]:
                v1.add_to_collection(v1.GraphKeys.ASSET_FILEPATHS, t)

    @contextlib.contextmanager
    def _colocated_with_state(self, node: Any) -> Iterator[None]:
        """Places a variable as the module graph does: next to the variables it is colocated
        with there (create_module_spec allows state to be colocated only with state)."""
        ops = [self._variable_map[t].op for t in colocation_targets(node)
               if t in self._variable_map and not tf.executing_eagerly()]
        ops = [op for op in ops if op.graph is v1.get_default_graph()]
        with contextlib.ExitStack() as stack:
            for op in ops:
                stack.enter_context(v1.colocate_with(op))
            yield

    def _initial_value_fns(self, vds: List[Any]) -> Dict[str, Callable[[], tf.Tensor]]:
        """Per variable, a function that imports its initializer subgraph where it is called:
        a variable built inside a function (wrap_function, tf.function, Defun) is lifted out
        of it, and its initial value must be built in the graph it is lifted to."""
        idx = self._index
        names = [vd.initial_value_name for vd in vds]
        if not all(names):
            bad = [vd.variable_name for vd in vds if not vd.initial_value_name]
            raise ValueError(f"the module's checkpoint does not hold variables {bad} and "
                             "their initial values are unknown")
        out: Dict[str, Callable[[], tf.Tensor]] = {}
        for vd, value_name in zip(vds, names):
            try:
                gd, used = idx.prune([value_name], [], set(self._state))
            except ValueError as e:
                raise NotImplementedError(
                    "hub.Module: an initial value of the module depends on a variable "
                    f"({e}); this is not supported") from e
            var_name = vd.variable_name.split(":")[0]

            def init_fn(gd=gd, used=used, value_name=value_name, var_name=var_name):
                return tf.graph_util.import_graph_def(
                    gd, input_map=self._input_map_for(used), return_elements=[value_name],
                    name=f"{self._scope}initial_values/{var_name}")[0]
            out[var_name] = init_fn
        return out

    def _input_map_for(self, used: Set[str]) -> Dict[str, tf.Tensor]:
        """State tensors for the keys an import uses: a variable's handle (resource
        variables) or a fresh read of it (ref variables of old modules)."""
        out = {}
        for key in used:
            value = self._state[key]
            if isinstance(value, tf.Variable):
                node = self._index.nodes[_op_name(key)]
                value = value.handle if node.op == "VarHandleOp" else value.value()
            if value.graph is not v1.get_default_graph():
                # State lifted out of a function graph (wrap_function, tf.function): an
                # identity here makes the function capture it; import_graph_def cannot.
                value = tf.identity(value)
            out[key] = value
        return out

    def _import_regularization_losses(self) -> None:
        names = self._index.regularization_losses
        if not names:
            return
        gd, used = self._index.prune(names, [], set(self._state))
        outs = tf.graph_util.import_graph_def(
            gd, input_map=self._input_map_for(used), return_elements=names,
            name=self._scope + "regularization_losses/")
        for t in outs:
            v1.add_to_collection(v1.GraphKeys.REGULARIZATION_LOSSES, t)

    # Application ----------------------------------------------------------------------------

    def __call__(self, inputs: Any = None, _sentinel: Any = None, signature: Optional[str] = None,
                 as_dict: Optional[bool] = None) -> Any:
        """Adds ops applying `signature` (default ``"default"``) to `inputs`.

        `inputs` is a Tensor (or value) when the signature has one input, else a dict.
        Returns the output ``"default"``, or the dict of all outputs if `as_dict`.
        """
        if _sentinel is not None:
            raise ValueError("signature and as_dict must be passed as keyword arguments")
        graph = _check_graph_mode("Applying a hub.Module")
        if graph is not self._graph:
            raise RuntimeError("a hub.Module can only be applied in the graph it was created in")
        signature = signature or "default"
        sig = self._spec._signature_def(signature, self._tags)  # pylint: disable=protected-access
        in_infos = self.get_input_info_dict(signature)
        out_infos = self.get_output_info_dict(signature)
        if not as_dict and "default" not in out_infos:
            raise ValueError(f"signature {signature!r} has no output 'default' (it has "
                             f"{sorted(out_infos)}): call the module with as_dict=True")
        if signature not in self._apply_cache:
            in_names = {t for info in sig.inputs.values() for t in tensor_names(info)}
            out_names = [t for info in sig.outputs.values() for t in tensor_names(info)]
            cut = in_names | set(self._state)
            updates = self._update_ops_for(cut) if self._trainable else []
            gd, used = self._index.prune(out_names + self._index.asset_paths, updates, cut)
            self._apply_cache[signature] = (gd, used, updates)
        gd, used, updates = self._apply_cache[signature]
        scope = graph.unique_name(f"{self._name}_apply_{signature}") + "/"
        with v1.name_scope(scope):
            converted = _convert_inputs(inputs, in_infos, signature)
            feeds: Dict[str, tf.Tensor] = {}
            for key, info in sig.inputs.items():
                value = converted[key]
                # A sparse or ragged value feeds its component tensors, in the order that
                # the signature lists them (nest's flattening, as build_tensor_info's).
                parts = tf.nest.flatten(value, expand_composites=True)
                feeds.update(zip(tensor_names(info), parts))
            input_map = self._input_map_for(used & set(self._state))
            input_map.update({k: v for k, v in feeds.items() if k in used})
            fetch = [t for info in sig.outputs.values() for t in tensor_names(info)
                     if t not in feeds and t not in self._state]
            assets = self._index.asset_paths
            colocations = self._colocations(gd, feeds, scope, signature)
            results = tf.graph_util.import_graph_def(
                gd, input_map=input_map, return_elements=fetch + updates + assets, name=scope
            ) if fetch or updates or assets else []
            for op_name, groups in colocations.items():
                graph.get_operation_by_name(op_name)._set_attr(  # pylint: disable=protected-access
                    "_class", attr_value_pb2.AttrValue(
                        list=attr_value_pb2.AttrValue.ListValue(s=groups)))
        for t in results[len(fetch) + len(updates):]:
            v1.add_to_collection(v1.GraphKeys.ASSET_FILEPATHS, t)
        results = results[:len(fetch) + len(updates)]
        for op in results[len(fetch):]:
            v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, op)
        got = dict(zip(fetch, results[:len(fetch)]))
        got.update(feeds)
        outputs = {}
        for key, info in sig.outputs.items():
            parts = [got[t] if t in got else self._input_map_for({t})[t]
                     for t in tensor_names(info)]
            if out_infos[key].is_composite:
                outputs[key] = tf.nest.pack_sequence_as(out_infos[key].type_spec, parts,
                                                        expand_composites=True)
            else:
                outputs[key] = tf.SparseTensor(*parts) if len(parts) == 3 else parts[0]
        return outputs if as_dict else outputs["default"]

    def _colocations(self, gd: graph_pb2.GraphDef, feeds: Mapping[str, tf.Tensor], scope: str,
                     signature: str) -> Dict[str, List[bytes]]:
        """The ``_class`` attribute each imported op gets: the module graph's colocation
        constraints (``loc:@<module op>``) restated in this graph. An op colocated with a
        variable or table follows the state this Module created; one colocated with a signature
        input follows the caller's tensor fed in for it; one colocated with an op imported
        alongside it follows that op. The import itself can only keep the last kind.

        ValueError (before anything is imported) if an op with several outputs would have to
        be placed in two different ways, e.g. its outputs fed from differently placed tensors.
        """
        graph = v1.get_default_graph()
        kept = {n.name for n in gd.node}
        fed: Dict[str, List[Tuple[int, str, tf.Tensor]]] = {}
        for name, t in feeds.items():
            name = _canonical(name)
            fed.setdefault(_op_name(name), []).append((int(name.rsplit(":", 1)[1]), name, t))
        resolved: Dict[str, List[bytes]] = {}

        def placement(target: str, user: str) -> List[bytes]:
            if target in resolved:
                return resolved[target]
            options: List[Tuple[List[bytes], str]] = []
            for _, name, t in sorted(fed.get(target, [])):
                groups = sorted(t.op.colocation_groups()) if t.graph is graph else []
                options.append((groups, f"the input {name!r} is fed {t.name!r}"))
            if target in self._index.state:
                state = self._state.get(target + ":0")
                op = state.op if state is not None else None
                groups = sorted(op.colocation_groups()) if op is not None and op.graph is graph \
                    else []
                options.append((groups, f"{target!r} is the module's state {getattr(op, 'name', '')!r}"))
            elif target in kept:
                options.append(([COLOCATION_PREFIX + (scope + target).encode("utf-8")],
                                f"other outputs of {target!r} are computed by the module"))
            for groups, why in options[1:]:
                if groups != options[0][0]:
                    raise ValueError(
                        f"Failed to rewrite colocation constraints while applying hub.Module "
                        f"{self._name!r} (signature {signature!r}): the op {scope + user!r} is "
                        f"colocated with {COLOCATION_PREFIX + (scope + target).encode('utf-8')!r} "
                        f"and that is ambiguous here: {options[0][0]!r} vs {groups!r}, because "
                        f"{options[0][1]} and {why}. Signature inputs that share an op "
                        "(tf.split, a SparseTensor's parts) must be fed from tensors placed "
                        "alike, or the module republished with single-output inputs.")
            resolved[target] = options[0][0] if options else []
            return resolved[target]

        out: Dict[str, List[bytes]] = {}
        for node in gd.node:
            original = self._index.nodes[node.name]
            targets = colocation_targets(original)
            if not targets:
                continue
            groups = sorted({g for t in targets for g in placement(t, node.name)})
            if groups:
                other = [s for s in original.attr["_class"].list.s
                         if not s.startswith(COLOCATION_PREFIX)]
                out[scope + node.name] = other + groups
        return out

    def _variable_state_keys(self) -> Set[str]:
        return {k for k, v in self._state.items() if isinstance(v, tf.Variable)}

    def _update_ops_for(self, cut: Set[str]) -> List[str]:
        """Every UPDATE_OPS op of the variant (e.g. batch norm's moving averages, a step
        counter): each joins each application (trainable modules only) and the consumer's
        UPDATE_OPS collection, whether or not this signature's inputs feed it. Only an op
        that needs another signature's inputs (a placeholder left unfed) is left out."""
        out = []
        for op in self._index.update_ops:
            try:
                gd, used = self._index.prune([], [op], cut)
            except ValueError as e:
                logger.warning("hub.Module: update op %r of the module is not applied: %s", op, e)
                continue
            if any(n.op in ("Placeholder", "PlaceholderV2") for n in gd.node):
                logger.info("hub.Module: update op %r needs inputs of another signature; "
                            "it is not part of this application", op)
                continue
            if any(self._index.nodes[_op_name(k)].op != "VarHandleOp"
                   for k in used if k in self._variable_state_keys()):
                logger.warning("hub.Module: update op %r of the module updates a ref variable; "
                               "it is not applied", op)
                continue
            out.append(op)
        return out

    # Introspection --------------------------------------------------------------------------

    def get_signature_names(self) -> List[str]:
        return self._spec.get_signature_names(self._tags)

    def get_input_info_dict(self, signature: Optional[str] = None) -> Dict[str, ParsedTensorInfo]:
        return self._spec.get_input_info_dict(signature, self._tags)

    def get_output_info_dict(self, signature: Optional[str] = None) -> Dict[str, ParsedTensorInfo]:
        return self._spec.get_output_info_dict(signature, self._tags)

    def get_attached_message(self, key: str, message_type: Any, required: bool = False) -> Any:
        """The message attached under `key` to this module's graph variant (see
        :func:`attach_message`)."""
        return self._spec.get_attached_message(key, message_type, tags=self._tags,
                                               required=required)

    @property
    def variable_map(self) -> Dict[str, Any]:
        """The module's variable names (``"dense/kernel"``) -> this graph's variables; a
        partitioned variable maps to the list of its parts, in order."""
        out: Dict[str, Any] = {}
        for name, var in sorted(self._variable_map.items()):
            full, _, part = name.rpartition("/part_")
            if full in self._partitions and part.isdigit():
                out.setdefault(full, []).append((int(part), var))
            else:
                out[name] = var
        return {k: [v for _, v in sorted(v)] if isinstance(v, list) else v
                for k, v in sorted(out.items())}

    @property
    def variables(self) -> List[tf.Variable]:
        out: List[tf.Variable] = []
        for v in self.variable_map.values():
            out.extend(v if isinstance(v, list) else [v])
        return out

    @property
    def name(self) -> str:
        return self._name

    def export(self, path: Union[str, "os.PathLike[str]"], session: Any) -> None:
        """Writes the module (all its graph variants) to `path` with the variables' current
        values in `session`: exporting a fine-tuned module keeps the fine-tuned weights."""
        if session.graph is not self._graph:
            raise RuntimeError("export() needs a session on the graph the module lives in")
        global_names = {vd.variable_name.split(":")[0] for vd in self._index.global_vars}
        fetch = {n: v for n, v in self._variable_map.items() if n in global_names}
        values = session.run(fetch) if fetch else {}
        write_module(self._spec._variants, path, values)  # pylint: disable=protected-access


def _convert_inputs(inputs: Any, infos: Mapping[str, ParsedTensorInfo], signature: str
                    ) -> Dict[str, Any]:
    if inputs is None:
        given: Dict[str, Any] = {}
    elif isinstance(inputs, Mapping):
        given = dict(inputs)
    elif len(infos) == 1:
        given = {next(iter(infos)): inputs}
    elif not infos:
        raise TypeError(f"signature {signature!r} takes no inputs")
    else:
        raise TypeError(f"signature {signature!r} has several inputs {sorted(infos)}: pass a dict")
    missing, extra = set(infos) - set(given), set(given) - set(infos)
    if missing or extra:
        raise TypeError(f"signature {signature!r} takes inputs {sorted(infos)}; missing "
                        f"{sorted(missing)}, unexpected {sorted(extra)}")
    out = {}
    for key, info in infos.items():
        value = given[key]
        if info.is_composite:
            if isinstance(value, tf.compat.v1.ragged.RaggedTensorValue):
                value = tf.ragged.constant(value.to_list(), dtype=info.dtype,
                                           ragged_rank=info.type_spec.ragged_rank)
            if not isinstance(value, tf.RaggedTensor):
                raise TypeError(f"input {key!r} of signature {signature!r} must be a "
                                "RaggedTensor")
            if value.dtype != info.dtype or value.ragged_rank != info.type_spec.ragged_rank:
                raise TypeError(f"input {key!r} of signature {signature!r} must be a "
                                f"RaggedTensor like {info.type_spec}, got {value}")
            out[key] = value
            continue
        if info.is_sparse:
            if not isinstance(value, (tf.SparseTensor, v1.SparseTensorValue)):
                raise TypeError(f"input {key!r} of signature {signature!r} must be a SparseTensor")
            t = value if isinstance(value, tf.SparseTensor) else tf.SparseTensor.from_value(value)
            got_dtype = t.dtype
        else:
            if isinstance(value, (tf.SparseTensor, v1.SparseTensorValue)):
                raise TypeError(f"input {key!r} of signature {signature!r} must be dense")
            if isinstance(value, (tf.Tensor, tf.Variable)):
                t = tf.convert_to_tensor(value)
            else:
                t = tf.convert_to_tensor(value, dtype=info.dtype)
            got_dtype = t.dtype.base_dtype
        if got_dtype != info.dtype:
            raise TypeError(f"input {key!r} of signature {signature!r} must be {info.dtype.name}, "
                            f"got {got_dtype.name}")
        if not info.get_shape().is_compatible_with(t.get_shape()):
            raise TypeError(f"input {key!r} of signature {signature!r} must have shape "
                            f"{info.get_shape()}, got {t.get_shape()}")
        out[key] = t
    return out


def _placeholder_for(name: str, info: ParsedTensorInfo) -> Any:
    if info.is_composite:
        spec = info.type_spec
        return v1.ragged.placeholder(info.dtype, spec.ragged_rank,
                                     value_shape=spec.shape[spec.ragged_rank + 1:], name=name)
    shape = None if info.get_shape().rank is None else info.get_shape().as_list()
    make = v1.sparse_placeholder if info.is_sparse else v1.placeholder
    return make(info.dtype, shape=shape, name=name)


@contextlib.contextmanager
def eval_function_for_module(spec: Union[ModuleSpec, str], tags: Optional[Any] = None
                             ) -> Iterator[Callable[..., Any]]:
    """Yields a function that evaluates the module on NumPy values (own graph and session),
    like tensorflow_hub's: ``f(inputs, signature=None, as_dict=None)``. Works from eager
    code too."""
    with tf.Graph().as_default() as graph:
        module = Module(spec, tags=tags)
        feeds: Dict[str, Dict[str, Any]] = {}
        fetches: Dict[str, Dict[str, Any]] = {}
        for sig in module.get_signature_names():
            with v1.name_scope(f"{sig}_inputs"):
                feeds[sig] = {k: _placeholder_for(k, info)
                              for k, info in module.get_input_info_dict(sig).items()}
            fetches[sig] = module(feeds[sig], signature=sig, as_dict=True)
        init = [v1.global_variables_initializer(), v1.local_variables_initializer(),
                v1.tables_initializer()]
        graph.finalize()
        with v1.Session(graph=graph) as sess:
            sess.run(init)

            def func(inputs: Any = None, _sentinel: Any = None, signature: Optional[str] = None,
                     as_dict: Optional[bool] = None) -> Any:
                signature = signature or "default"
                if signature not in feeds:
                    raise KeyError(f"signature {signature!r} is missing; the module has "
                                   f"{sorted(feeds)}")
                ph = feeds[signature]
                if inputs is None:
                    inputs = {}
                elif not isinstance(inputs, Mapping):
                    if len(ph) != 1:
                        raise TypeError(f"signature {signature!r} has several inputs: pass a dict")
                    inputs = {next(iter(ph)): inputs}
                out = sess.run(fetches[signature], {ph[k]: v for k, v in inputs.items()})
                return out if as_dict else out["default"]

            yield func


# Graph collection of (export_name, Module) pairs: register_module_for_export.
_EXPORT_COLLECTION = "hubfast_modules_for_export"


def register_module_for_export(module: Module, export_name: str) -> None:
    """Registers `module` to be exported as `export_name` by
    :func:`export_registered_modules` (tensorflow_hub's LatestModuleExporter, a tf.estimator
    exporter, is gone with tf.estimator). ValueError if the name is taken in this graph."""
    if not isinstance(module, Module):
        raise TypeError(f"expected a hubfast Module, got {module!r}")
    for used, _ in v1.get_collection(_EXPORT_COLLECTION):
        if used == export_name:
            raise ValueError(f"There is already a module registered to be exported as "
                             f"{export_name!r}")
    v1.add_to_collection(_EXPORT_COLLECTION, (export_name, module))


def export_registered_modules(export_dir: Union[str, "os.PathLike[str]"], session: Any
                              ) -> Dict[str, str]:
    """Exports every module registered in the session's graph to ``export_dir/<name>``, with
    the variables' values in `session`; returns name -> path."""
    out = {}
    for name, module in session.graph.get_collection(_EXPORT_COLLECTION):
        path = os.path.join(os.fspath(export_dir), name)
        module.export(path, session)
        out[name] = path
    return out


class LatestModuleExporter:
    """Not available: tensorflow_hub's LatestModuleExporter is a ``tf.estimator.Exporter``
    and TensorFlow 2.16+ has no ``tf.estimator``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "hubfast has no LatestModuleExporter: it is a tf.estimator Exporter, and "
            "tf.estimator is gone from TensorFlow >= 2.16. Export a fine-tuned module with "
            "Module.export(path, session), or ModuleSpec.export(path, checkpoint_path=...) "
            "from a training checkpoint.")
