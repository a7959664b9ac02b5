"""hub.Module, create_module_spec, add_signature, Module.export, load_module_spec: the TF1 Hub
format API of the TF1 seed page, on TF 2.21's tf.compat.v1 (hubfast.module_v1).

The cases run in one worker process (see ``tf_helpers.py``: the pytest process never imports
TensorFlow); pytest reports each case on its own. Graph-mode code runs inside
``with tf.Graph().as_default():`` only, never with eager execution disabled globally, so the
TF2 parity cases (hubfast.load, tensorflow_hub.load) run in the same worker.
"""
from __future__ import annotations

import pytest

import tf_helpers as th

pytestmark = [pytest.mark.tf, pytest.mark.slow]

CASES = th.Cases(__file__)

W = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
B = [0.5, -0.5, 1.0]
L2 = 0.01
TRAIN_SCALE = 0.5  # the {"train"} variant scales its output (a dropout-like difference)


def _np():
    import numpy as np

    return np


def module_fn(is_training=False):
    """The seed page's module_fn, with tf.compat.v1 ops (tf.compat.v1.layers is gone under
    Keras 3): a dense layer with an L2 regularizer, a default signature with two outputs and a
    fruit_to_pet signature with dict inputs and outputs."""
    import tensorflow as tf

    from hubfast.module_v1 import add_signature

    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, shape=[None, 2], name="x")
    w = v1.get_variable("dense/kernel", shape=[2, 3], initializer=v1.constant_initializer(W),
                        regularizer=lambda t: L2 * tf.reduce_sum(tf.square(t)))
    b = v1.get_variable("dense/bias", shape=[3], initializer=v1.constant_initializer(B))
    hidden = tf.matmul(x, w)
    y = hidden + b
    if is_training:
        y = y * TRAIN_SCALE
    add_signature(inputs=x, outputs=dict(default=y, hidden_activations=hidden))
    apples = v1.placeholder(tf.float32, shape=[None, 2], name="apples")
    oranges = v1.placeholder(tf.float32, shape=[None, 2], name="oranges")
    add_signature(name="fruit_to_pet", inputs=dict(apples=apples, oranges=oranges),
                  outputs=dict(cats=tf.matmul(apples, w) + b, dogs=tf.matmul(oranges, w) - b))


TAGS_AND_ARGS = [(set(), {"is_training": False}), ({"train"}, {"is_training": True})]


def _expected(x, w=W, b=B, scale=1.0):
    np = _np()
    f32 = np.float32
    return (np.asarray(x, f32) @ np.asarray(w, f32) + np.asarray(b, f32)) * scale


def _spec():
    from hubfast.module_v1 import create_module_spec

    return create_module_spec(module_fn, tags_and_args=TAGS_AND_ARGS)


# Fine-tuned-looking weights an exported module must carry (not the initializers' values).
W_EXPORT = [[0.5, -1.0, 2.0], [1.5, 0.25, -3.0]]
B_EXPORT = [0.1, 0.2, 0.3]


def _exported(ctx):
    """Exports the spec with W_EXPORT/B_EXPORT assigned in the session (once per worker)."""
    if not hasattr(ctx, "_module_v1_export"):
        import tensorflow as tf

        from hubfast.module_v1 import Module

        v1 = tf.compat.v1
        path = str(ctx.tmp("export") / "module")
        with tf.Graph().as_default():
            m = Module(_spec())
            with v1.Session() as sess:
                sess.run(v1.global_variables_initializer())
                sess.run([m.variable_map["dense/kernel"].assign(W_EXPORT),
                          m.variable_map["dense/bias"].assign(B_EXPORT)])
                m.export(path, sess)
        ctx._module_v1_export = path
    return ctx._module_v1_export


def _run_default(handle_or_spec, x, **module_kwargs):
    import tensorflow as tf

    from hubfast.module_v1 import Module

    v1 = tf.compat.v1
    with tf.Graph().as_default():
        m = Module(handle_or_spec, **module_kwargs)
        y = m(tf.constant(x, tf.float32))
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            return sess.run(y)


# ---------------------------------------------------------------------------
# Cases (run in the worker)
# ---------------------------------------------------------------------------


@CASES.case
def case_spec_signatures_and_apply(ctx):
    """create_module_spec + Module(spec): the seed page's calls, in a tf.compat.v1 graph."""
    tf, _, _ = ctx.imports()
    np = _np()
    from hubfast.module_v1 import Module

    v1 = tf.compat.v1
    spec = _spec()
    assert [sorted(t) for t in spec.get_tags()] == [[], ["train"]]
    assert spec.get_signature_names() == ["default", "fruit_to_pet"]
    ins = spec.get_input_info_dict("fruit_to_pet")
    assert sorted(ins) == ["apples", "oranges"]
    assert ins["apples"].dtype == tf.float32 and ins["apples"].get_shape().as_list() == [None, 2]
    assert not ins["apples"].is_sparse
    outs = spec.get_output_info_dict()
    assert sorted(outs) == ["default", "hidden_activations"]
    assert outs["default"].get_shape().as_list() == [None, 3]

    x = [[1.0, 2.0], [-1.0, 0.5]]
    with tf.Graph().as_default():
        m = Module(spec)
        assert m.get_signature_names() == ["default", "fruit_to_pet"]
        assert sorted(m.get_output_info_dict("fruit_to_pet")) == ["cats", "dogs"]
        assert sorted(m.variable_map) == ["dense/bias", "dense/kernel"]
        assert m.variable_map["dense/kernel"].name == "module/dense/kernel:0"
        y = m(tf.constant(x))
        both = m(tf.constant(x), as_dict=True)
        pets = m(dict(apples=x, oranges=[[0.0, 1.0], [2.0, 2.0]]), signature="fruit_to_pet",
                 as_dict=True)
        assert sorted(pets) == ["cats", "dogs"]
        assert v1.trainable_variables() == [], "trainable=False must not train the module"
        assert v1.losses.get_regularization_losses() == []
        with pytest.raises(ValueError, match="as_dict=True"):
            m(dict(apples=x, oranges=x), signature="fruit_to_pet")
        with pytest.raises(TypeError, match="several inputs"):
            m(tf.constant(x), signature="fruit_to_pet", as_dict=True)
        with pytest.raises(TypeError, match="missing"):
            m(dict(apples=x), signature="fruit_to_pet", as_dict=True)
        with pytest.raises(TypeError, match="float32"):
            m(tf.constant([[1, 2]], tf.int32))
        with pytest.raises(TypeError, match="shape"):
            m(tf.constant([[1.0, 2.0, 3.0]]))
        with pytest.raises(KeyError, match="nope"):
            m(tf.constant(x), signature="nope")
        m2 = Module(spec)  # a second instance: own scope, own variables
        assert m2.variable_map["dense/kernel"].name == "module_1/dense/kernel:0"
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            got_y, got_both, got_pets = sess.run([y, both, pets])
    np.testing.assert_allclose(got_y, _expected(x), rtol=1e-6)
    np.testing.assert_allclose(got_both["default"], got_y)
    np.testing.assert_allclose(got_both["hidden_activations"], np.asarray(x) @ np.asarray(W))
    np.testing.assert_allclose(got_pets["cats"], _expected(x), rtol=1e-6)
    np.testing.assert_allclose(got_pets["dogs"],
                               np.asarray([[0.0, 1.0], [2.0, 2.0]]) @ np.asarray(W) - B, rtol=1e-6)


@CASES.case
def case_applications_share_variables(ctx):
    """Two applications: no new variables, equal outputs, and both read the same variables."""
    tf, _, _ = ctx.imports()
    np = _np()
    from hubfast.module_v1 import Module

    v1 = tf.compat.v1
    x = [[3.0, -2.0]]
    with tf.Graph().as_default():
        m = Module(_exported(ctx))
        n_vars = len(v1.global_variables())
        assert n_vars == 2
        y1 = m(tf.constant(x))
        y2 = m(tf.constant(x))
        pets = m(dict(apples=x, oranges=x), signature="fruit_to_pet", as_dict=True)
        assert len(v1.global_variables()) == n_vars
        assert y1.name != y2.name, "each application adds its own ops"
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            a, b, c = sess.run([y1, y2, pets["cats"]])
            np.testing.assert_allclose(a, b)
            np.testing.assert_allclose(a, c)
            np.testing.assert_allclose(a, _expected(x, W_EXPORT, B_EXPORT), rtol=1e-6)
            sess.run(m.variable_map["dense/bias"].assign([10.0, 20.0, 30.0]))
            a, b, c = sess.run([y1, y2, pets["cats"]])
    want = _expected(x, W_EXPORT, [10.0, 20.0, 30.0])
    for got in (a, b, c):
        np.testing.assert_allclose(got, want, rtol=1e-6)


@CASES.case
def case_export_layout_and_load_module_spec(ctx):
    """Module.export writes a TF1 Hub module: one MetaGraph per variant, the session's values,
    tfhub_module.pb; load_module_spec reads it back; Module(path) starts from those values."""
    tf, _, _ = ctx.imports()
    np = _np()
    import os

    from tensorflow.core.protobuf import saved_model_pb2

    from hubfast.module_v1 import load_module_spec

    path = _exported(ctx)
    with open(os.path.join(path, "tfhub_module.pb"), "rb") as f:
        assert f.read() == b"\x08\x03"
    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    assert sorted(sorted(mg.meta_info_def.tags) for mg in sm.meta_graphs) == [[], ["train"]]
    for mg in sm.meta_graphs:
        assert sorted(mg.signature_def) == ["default", "fruit_to_pet"]
        assert "regularization_losses" in mg.collection_def
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    np.testing.assert_allclose(reader.get_tensor("dense/kernel"), W_EXPORT)
    np.testing.assert_allclose(reader.get_tensor("dense/bias"), B_EXPORT)

    spec = load_module_spec(path)
    assert [sorted(t) for t in spec.get_tags()] == [[], ["train"]]
    assert spec.get_signature_names(tags={"train"}) == ["default", "fruit_to_pet"]
    assert spec.get_input_info_dict()["default"].get_shape().as_list() == [None, 2]
    x = [[1.0, 1.0], [0.0, 2.0]]
    np.testing.assert_allclose(_run_default(spec, x), _expected(x, W_EXPORT, B_EXPORT), rtol=1e-6)
    np.testing.assert_allclose(_run_default(path, x), _expected(x, W_EXPORT, B_EXPORT), rtol=1e-6)

    # ModuleSpec.export from a checkpoint, and refusing to overwrite a module.
    again = str(ctx.tmp("respec") / "module")
    spec.export(again)
    np.testing.assert_allclose(_run_default(again, x), _expected(x, W_EXPORT, B_EXPORT), rtol=1e-6)
    with pytest.raises(FileExistsError):
        spec.export(again)
    assert sorted(os.listdir(os.path.dirname(again))) == ["module"], "temp dirs left behind"


@CASES.case
def case_train_tags_pick_training_variant(ctx):
    tf, _, _ = ctx.imports()
    np = _np()
    x = [[1.0, -1.0]]
    path = _exported(ctx)
    default = _run_default(path, x)
    train = _run_default(path, x, tags={"train"})
    np.testing.assert_allclose(default, _expected(x, W_EXPORT, B_EXPORT), rtol=1e-6)
    np.testing.assert_allclose(train, _expected(x, W_EXPORT, B_EXPORT, TRAIN_SCALE), rtol=1e-6)
    with tf.Graph().as_default():
        from hubfast.module_v1 import Module

        with pytest.raises(ValueError, match="serving"):
            Module(path, tags={"serving"})


@CASES.case
def case_fine_tuning(ctx):
    """trainable=True: variables in TRAINABLE_VARIABLES, REGULARIZATION_LOSSES collected, a
    GradientDescent step moves the module's weights, and export keeps the fine-tuned ones."""
    tf, _, _ = ctx.imports()
    np = _np()
    import os

    from hubfast.module_v1 import Module

    v1 = tf.compat.v1
    x = np.asarray([[1.0, 2.0], [3.0, -1.0]], np.float32)
    target = np.zeros([2, 3], np.float32)
    out = str(ctx.tmp("finetuned") / "module")
    with tf.Graph().as_default():
        m = Module(_exported(ctx), trainable=True, tags={"train"}, name="encoder")
        assert set(v1.trainable_variables()) == set(m.variables)
        y = m(tf.constant(x))
        reg = v1.losses.get_regularization_losses()
        assert len(reg) == 1, reg
        loss = tf.reduce_mean(tf.square(y - target)) + tf.add_n(reg)
        step = v1.train.GradientDescentOptimizer(0.01).minimize(loss)
        n_global = len(v1.global_variables())
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            np.testing.assert_allclose(sess.run(reg[0]),
                                       L2 * np.sum(np.square(W_EXPORT)), rtol=1e-5)
            before = sess.run(m.variable_map)
            loss0 = sess.run(loss)
            for _ in range(3):
                sess.run(step)
            after = sess.run(m.variable_map)
            assert sess.run(loss) < loss0
            assert not np.allclose(before["dense/kernel"], after["dense/kernel"])
            assert not np.allclose(before["dense/bias"], after["dense/bias"])
            m.export(out, sess)
        assert len(v1.global_variables()) == n_global
    reader = tf.train.load_checkpoint(os.path.join(out, "variables", "variables"))
    np.testing.assert_allclose(reader.get_tensor("dense/kernel"), after["dense/kernel"])
    got = _run_default(out, x)
    np.testing.assert_allclose(got, _expected(x, after["dense/kernel"], after["dense/bias"]),
                               rtol=1e-5)


@CASES.case
def case_update_ops_join_trainable_applications(ctx):
    """A batch-norm-like moving mean in the {"train"} variant: a trainable Module's applications
    bring the module's UPDATE_OPS (fed by that application's inputs) into the graph's collection,
    and running them updates the module's variable; a frozen Module adds none."""
    tf, _, _ = ctx.imports()
    np = _np()
    from hubfast.module_v1 import Module, add_signature, create_module_spec

    v1 = tf.compat.v1

    def fn(is_training=False):
        x = v1.placeholder(tf.float32, [None, 2], name="x")
        mm = v1.get_variable("moving_mean", [2], initializer=v1.zeros_initializer(),
                             trainable=False)
        if is_training:
            mean = tf.reduce_mean(x, 0)
            update = mm.assign_sub(0.5 * (mm - mean), read_value=False)
            v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, update)
            add_signature(inputs=x, outputs=x - mean)
        else:
            add_signature(inputs=x, outputs=x - mm)

    spec = create_module_spec(fn, [(set(), {}), ({"train"}, {"is_training": True})])
    with tf.Graph().as_default():
        m = Module(spec, trainable=True, tags={"train"})
        m([[2.0, 4.0], [4.0, 8.0]])
        assert v1.trainable_variables() == [], "moving_mean is not trainable in the module"
        updates = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        assert len(updates) == 1, updates
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(updates)
            np.testing.assert_allclose(sess.run(m.variable_map["moving_mean"]), [1.5, 3.0])
    with tf.Graph().as_default():
        Module(spec, tags={"train"})([[2.0, 4.0]])
        assert v1.get_collection(v1.GraphKeys.UPDATE_OPS) == []


@CASES.case
def case_archive_and_server_url(ctx):
    """Module from a local .tar.gz and from a loopback TF Hub server URL (through the cache)."""
    tf, _, _ = ctx.imports()
    np = _np()
    import os

    from hubfast.testing.models import pack_tar
    from hubfast.server import TFHubServer

    archive = str(ctx.tmp("archive") / "module.tar.gz")
    pack_tar(_exported(ctx), archive, "gz")
    x = [[2.0, 0.5]]
    want = _expected(x, W_EXPORT, B_EXPORT)
    np.testing.assert_allclose(_run_default(archive, x), want, rtol=1e-6)
    with TFHubServer() as srv:
        srv.add_archive("/org/module/1", archive)
        url = srv.url + "/org/module/1"
        np.testing.assert_allclose(_run_default(url, x, tags={"train"}),
                                   _expected(x, W_EXPORT, B_EXPORT, TRAIN_SCALE), rtol=1e-6)
    cache = os.environ["TFHUB_CACHE_DIR"]
    assert any(n.endswith(".descriptor.txt") for n in os.listdir(cache)), os.listdir(cache)


@CASES.case
def case_tf2_load_parity(ctx):
    """The exported module loads in TF2 eager mode with hubfast.load and tensorflow_hub.load
    (TF1 module: empty tag set by default) and gives graph mode's outputs."""
    tf, _, hub = ctx.imports()
    np = _np()
    import tensorflow_hub

    path = _exported(ctx)
    x = np.asarray([[1.0, 2.0], [0.5, -0.5]], np.float32)
    graph_out = _run_default(path, x)
    for loader in (hub.load, tensorflow_hub.load):
        obj = loader(path)
        assert sorted(obj.signatures) == ["default", "fruit_to_pet"], loader
        out = obj.signatures["default"](default=tf.constant(x))
        np.testing.assert_allclose(out["default"].numpy(), graph_out, rtol=1e-6)
        pets = obj.signatures["fruit_to_pet"](apples=tf.constant(x), oranges=tf.constant(x))
        np.testing.assert_allclose(pets["cats"].numpy(), graph_out, rtol=1e-6)
    train = hub.load(path, tags={"train"})
    np.testing.assert_allclose(train.signatures["default"](default=tf.constant(x))["default"],
                               graph_out * TRAIN_SCALE, rtol=1e-6)


@CASES.case
def case_legacy_builder_module(ctx):
    """A TF1 Hub module written by plain SavedModel Builder code (hubfast.testing.models)."""
    tf, _, _ = ctx.imports()
    np = _np()
    from hubfast.module_v1 import Module

    v1 = tf.compat.v1
    legacy = ctx.model("tf1")
    with tf.Graph().as_default():
        m = Module(legacy)
        assert m.get_input_info_dict()["x"].get_shape().as_list() == [None, 2]
        y = m([[1.0, 0.0]])
        pets = m(dict(apples=[[0.0, 1.0]], oranges=[[0.0, 1.0]]), signature="fruit_to_pet",
                 as_dict=True)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            got, got_pets = sess.run([y, pets])
    np.testing.assert_allclose(got, _expected([[1.0, 0.0]]))
    np.testing.assert_allclose(got_pets["dogs"], [np.asarray(W[1]) - B])


@CASES.case
def case_tables_assets_sparse_and_ref_variables(ctx):
    """Lookup tables from an asset vocabulary, an old-style ref variable, a sparse signature;
    the exported module keeps working after the original vocabulary file is gone."""
    tf, _, hub = ctx.imports()
    np = _np()
    import os

    from hubfast.module_v1 import (Module, add_signature, create_module_spec,
                                   eval_function_for_module)

    v1 = tf.compat.v1
    work = ctx.tmp("tables")
    vocab = str(work / "vocab.txt")
    with open(vocab, "w") as f:
        f.write("apple\nbanana\ncherry\n")

    def fn():
        words = v1.placeholder(tf.string, [None], name="words")
        init = tf.lookup.TextFileInitializer(vocab, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                             tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
        table = tf.lookup.StaticHashTable(init, -1)
        emb = v1.get_variable("emb", [3, 2], use_resource=False,
                              initializer=v1.constant_initializer([[1, 1], [2, 2], [3, 3]]))
        add_signature(inputs=words, outputs=tf.gather(emb, tf.maximum(table.lookup(words), 0)))
        sp = v1.sparse_placeholder(tf.float32, [None, 3], name="sp")
        add_signature("sparse", sp, dict(default=tf.sparse.reduce_sum(sp, 1), same=sp))

    out = str(work / "module")
    st = tf.compat.v1.SparseTensorValue([[0, 1], [1, 2]], [1.0, 2.0], [2, 3])
    with tf.Graph().as_default():
        m = Module(create_module_spec(fn), name="words")
        m_other = Module(create_module_spec(fn), name="words")  # its own table
        y = m(["banana", "cherry", "durian"])
        y_other = m_other(["apple"])
        sparse = m(st, signature="sparse", as_dict=True)
        assert sparse["same"].__class__.__name__ == "SparseTensor"
        assert len(v1.get_collection(v1.GraphKeys.TABLE_INITIALIZERS)) == 2
        with v1.Session() as sess:
            sess.run([v1.global_variables_initializer(), v1.tables_initializer()])
            got, got_other, got_sparse = sess.run([y, y_other, sparse])
            m.export(out, sess)
    np.testing.assert_allclose(got, [[2, 2], [3, 3], [1, 1]])
    np.testing.assert_allclose(got_other, [[1, 1]])
    np.testing.assert_allclose(got_sparse["default"], [1.0, 2.0])
    np.testing.assert_array_equal(got_sparse["same"].indices, [[0, 1], [1, 2]])
    os.remove(vocab)
    assert os.listdir(os.path.join(out, "assets")) == ["vocab.txt"]
    with eval_function_for_module(out) as f:
        np.testing.assert_allclose(f(["cherry", "apple"]), [[3, 3], [1, 1]])
        np.testing.assert_allclose(f(st, signature="sparse"), [1.0, 2.0])
    obj = hub.load(out)
    got_tf2 = obj.signatures["default"](default=tf.constant(["banana"]))["default"]
    np.testing.assert_allclose(got_tf2, [[2, 2]])


@CASES.case
def case_misuse_errors(ctx):
    tf, _, _ = ctx.imports()
    from hubfast.module_v1 import LatestModuleExporter, Module, add_signature, create_module_spec

    assert tf.executing_eagerly()
    with pytest.raises(RuntimeError, match="hubfast.load"):
        Module(_spec())
    with pytest.raises(RuntimeError, match="create_module_spec"):
        add_signature(inputs=tf.constant(1.0), outputs=tf.constant(1.0))
    with pytest.raises(NotImplementedError, match="tf.estimator"):
        LatestModuleExporter("name", lambda: None)
    with pytest.raises(ValueError, match="no signature"):
        create_module_spec(lambda: None)
    tf2_model = ctx.model("mul")
    with pytest.raises(ValueError, match="not a TF1 Hub format module"):
        with tf.Graph().as_default():
            Module(tf2_model)
    with tf.Graph().as_default():
        m = Module(_spec())
    with tf.Graph().as_default():
        with pytest.raises(RuntimeError, match="graph it was created in"):
            m([[1.0, 2.0]])


# ---------------------------------------------------------------------------
# pytest side
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_v1_session(request, tmp_path_factory):
    run = CASES.session(request, tmp_path_factory.mktemp("module_v1_cases"))
    yield run
    run.wait()


@pytest.mark.parametrize("name", CASES.shared_names())
def test_case(module_v1_session, name):
    module_v1_session.check(name)
