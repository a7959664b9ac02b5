"""tensorflow_hub 0.15's feature columns and image-module helpers, brought back on TF 2.x's
tf.feature_column without tf.estimator (hubfast.feature_column, hubfast.image_util), and the
other 0.15 names: create_module_spec_from_saved_model, register_module_for_export.

The worker runs with tf_keras (``TF_USE_LEGACY_KERAS=1``): its DenseFeatures layer is the v2
consumer of feature columns (Keras 3 has none).
"""
from __future__ import annotations

import pytest

import tf_helpers as th

pytestmark = [pytest.mark.tf, pytest.mark.slow]

CASES = th.Cases(__file__, env={"TF_USE_LEGACY_KERAS": "1"})

# word -> embedding of the toy text module; any other word gets the first row.
WORDS = {"": [0.0, 0.0], "sun": [1.0, 3.0], "rain": [-2.0, 5.0]}


def _text_fn():
    import tensorflow as tf

    import hubfast as hub

    v1 = tf.compat.v1
    words = list(WORDS)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(words, list(range(len(words))), tf.string, tf.int64),
        0)
    emb = v1.get_variable("emb", initializer=tf.constant([WORDS[w] for w in words]))
    text = v1.placeholder(tf.string, [None], name="text")
    hub.add_signature(inputs=text, outputs=tf.gather(emb, table.lookup(text)))


def _image_fn(size=(2, 3), info=None):
    """Mean colour of an image, times 2, as a [batch, 3] feature."""
    def fn():
        import tensorflow as tf

        import hubfast as hub

        v1 = tf.compat.v1
        images = v1.placeholder(tf.float32, [None, size[0], size[1], 3], name="images")
        scale = v1.get_variable("scale", initializer=2.0)
        hub.add_signature(inputs=dict(images=images),
                          outputs=tf.reduce_mean(images, axis=[1, 2]) * scale)
        if info:
            msg = hub.ImageModuleInfo()
            msg.default_image_size.height, msg.default_image_size.width = info
            hub.attach_image_module_info(msg)
    return fn


def _run(tensor, init_tables=True):
    import tensorflow as tf

    v1 = tf.compat.v1
    with v1.Session() as sess:
        sess.run(v1.global_variables_initializer())
        if init_tables:
            sess.run(v1.tables_initializer())
        return sess.run(tensor)


@CASES.case
def case_text_columns_in_input_layer(ctx):
    """text_embedding_column and sparse_text_embedding_column in input_layer: shapes, parse
    specs, config, the sum/mean combiners and empty rows; a text module with a fixed batch
    size is refused."""
    tf, _, _ = ctx.imports()
    np = __import__("numpy")
    import hubfast as hub

    v1 = tf.compat.v1
    spec = hub.create_module_spec(_text_fn)
    dense = hub.text_embedding_column("note", spec)
    assert dense.name == "note_hub_module_embedding" and dense.parents == ["note"]
    assert dense.variable_shape == [2]
    assert v1.feature_column.make_parse_example_spec([dense]) == {
        "note": tf.io.FixedLenFeature([1], tf.string)}
    summed = hub.sparse_text_embedding_column("tags", spec, "sum", None)
    meaned = hub.sparse_text_embedding_column("tags2", spec, "mean", "rain")
    assert v1.feature_column.make_parse_example_spec([summed]) == {
        "tags": tf.io.VarLenFeature(tf.string)}
    tags = tf.compat.v1.SparseTensorValue([[0, 0], [0, 1], [2, 0]], ["sun", "rain", "sun"], [3, 2])
    with tf.Graph().as_default():
        out = v1.feature_column.input_layer(
            {"note": [["sun"], ["fog"], ["rain"]], "tags": tags, "tags2": tags},
            [dense, summed, meaned])
        got = _run(out)
    np.testing.assert_allclose(got, [  # columns by name: note, tags2 (mean), tags (sum)
        [1, 3, -0.5, 4, -1, 8],
        [0, 0, -2, 5, 0, 0],      # fog is unknown; an empty row: the default's, or zeros
        [-2, 5, 1, 3, 1, 3]])

    def fixed_fn():
        text = v1.placeholder(tf.string, [4])
        hub.add_signature(inputs=text, outputs=tf.zeros([4, 2]))

    with pytest.raises(ValueError, match="only one input"):
        hub.text_embedding_column("x", hub.create_module_spec(fixed_fn))
    with pytest.raises(NotImplementedError, match="Can only generate"):
        dense.get_config()
    path = str(ctx.tmp("text") / "module")
    with tf.Graph().as_default():
        m = hub.Module(spec)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            m.export(path, sess)
    by_path = hub.text_embedding_column("note", path, trainable=True)
    clone = type(by_path).from_config(by_path.get_config())
    assert clone == by_path and clone.variable_shape == [2]


@CASES.case
def case_text_column_in_dense_features_trains_shared_state(ctx):
    """Through tf_keras DenseFeatures the module is created once per layer: two applications
    share the embedding, and training one moves both."""
    tf, keras, _ = ctx.imports()
    import hubfast as hub

    v1 = tf.compat.v1
    column = hub.text_embedding_column("note", hub.create_module_spec(_text_fn), trainable=True)
    with tf.Graph().as_default():
        layer = keras.layers.DenseFeatures([column])
        first = layer({"note": ["sun"]})
        second = layer({"note": ["sun"]})
        assert len(v1.trainable_variables()) == 1, v1.trainable_variables()
        train = v1.train.GradientDescentOptimizer(0.5).minimize(tf.reduce_sum(first))
        with v1.Session() as sess:
            sess.run([v1.global_variables_initializer(), v1.tables_initializer()])
            assert sess.run(second).tolist() == [[1.0, 3.0]]
            sess.run(train)
            a, b = sess.run([first, second])
    assert a.tolist() == b.tolist() == [[0.5, 2.5]]


@CASES.case
def case_image_column_and_image_utils(ctx):
    """get_expected_image_size from the input shape or an attached ImageModuleInfo (which
    wins), get_num_image_channels, and image_embedding_column in input_layer."""
    tf, _, _ = ctx.imports()
    np = __import__("numpy")
    import hubfast as hub

    v1 = tf.compat.v1
    spec = hub.create_module_spec(_image_fn())
    assert hub.get_expected_image_size(spec) == [2, 3]
    assert hub.get_num_image_channels(spec) == 3
    any_size = hub.create_module_spec(_image_fn((None, None)))
    with pytest.raises(ValueError, match="any size"):
        hub.get_expected_image_size(any_size)
    with pytest.raises(ValueError, match="any size"):
        hub.image_embedding_column("photo", any_size)
    told = hub.create_module_spec(_image_fn((None, None), info=(5, 7)))
    assert hub.get_expected_image_size(told) == [5, 7]
    with tf.Graph().as_default():
        assert hub.get_expected_image_size(hub.Module(told)) == [5, 7]
    sized = hub.image_embedding_column("photo", any_size, image_size=[4, 4])
    assert v1.feature_column.make_parse_example_spec([sized]) == {
        "photo": tf.io.FixedLenFeature([4, 4, 3], tf.float32)}
    column = hub.image_embedding_column("photo", spec)
    assert column.variable_shape == [3] and column.parents == ["photo"]
    photos = np.arange(2 * 2 * 3 * 3, dtype=np.float32).reshape(2, 2, 3, 3) / 36
    with tf.Graph().as_default():
        got = _run(v1.feature_column.input_layer({"photo": photos}, [column]), False)
    np.testing.assert_allclose(got, photos.mean(axis=(1, 2)) * 2, rtol=1e-6)


@CASES.case
def case_spec_from_saved_model_and_registered_exports(ctx):
    """A TF1 SavedModel written by the Builder becomes a ModuleSpec (its init op dropped, its
    weights restored); register_module_for_export + export_registered_modules write it out as
    a module; a name registered twice is a ValueError."""
    tf, _, _ = ctx.imports()
    import os

    import hubfast as hub
    from hubfast.module_v1 import export_registered_modules

    v1 = tf.compat.v1
    sm = str(ctx.tmp("saved") / "sm")
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None], name="x")
        w = v1.get_variable("w", initializer=3.0)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(w.assign(4.0))
            b = v1.saved_model.Builder(sm)
            sig = v1.saved_model.predict_signature_def({"x": x}, {"default": x * w})
            b.add_meta_graph_and_variables(sess, ["serve"], signature_def_map={"default": sig},
                                           main_op=v1.tables_initializer())
            b.save()
    spec = hub.create_module_spec_from_saved_model(sm)
    out = str(ctx.tmp("exported"))
    with tf.Graph().as_default():
        m = hub.Module(spec, tags={"serve"})
        y = m([1.0, 2.0])
        hub.register_module_for_export(m, "times4")
        with pytest.raises(ValueError, match="already"):
            hub.register_module_for_export(m, "times4")
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            assert sess.run(y).tolist() == [4.0, 8.0]
            paths = export_registered_modules(out, sess)
    assert paths == {"times4": os.path.join(out, "times4")}
    with hub.eval_function_for_module(paths["times4"], tags={"serve"}) as f:
        assert f([0.5]).tolist() == [2.0]
    with pytest.raises(ValueError, match="neither saved_model.pb"):
        hub.create_module_spec_from_saved_model(out)


# ---------------------------------------------------------------------------
# pytest side
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_columns_session(request, tmp_path_factory):
    run = CASES.session(request, tmp_path_factory.mktemp("feature_column_cases"))
    yield run
    run.wait()


@pytest.mark.parametrize("name", CASES.shared_names())
def test_case(feature_columns_session, name):
    feature_columns_session.check(name)
