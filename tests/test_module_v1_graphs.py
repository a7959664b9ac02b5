"""hub.Module beyond one plain TF1 graph: update ops that no input feeds, a module built inside
tf.compat.v1.wrap_function (eager caller) or a tf.function traced in a TF1 graph, colocation
constraints restated in the consumer's graph, and the error types, assets and attached messages
of the TF1 API (hubfast.module_v1).

The cases run in one worker process (``tf_helpers.py``); graph-mode code stays inside
``with tf.Graph().as_default():``.
"""
from __future__ import annotations

import pytest

import tf_helpers as th

pytestmark = [pytest.mark.tf, pytest.mark.slow]

CASES = th.Cases(__file__)


def _ticker_fn():
    """A module whose only signature takes no input and reads a tick count; its UPDATE_OPS
    adds one tick (nothing the signature's inputs feed)."""
    import tensorflow as tf

    from hubfast.module_v1 import add_signature

    v1 = tf.compat.v1
    ticks = v1.get_variable("ticks", [], tf.int32, initializer=v1.zeros_initializer(),
                            trainable=False)
    v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, ticks.assign_add(1))
    add_signature(outputs=ticks.read_value())


def _offset_fn():
    """y = x + offset, offset a trainable variable that starts at 10."""
    import tensorflow as tf

    from hubfast.module_v1 import add_signature

    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [], name="x")
    offset = v1.get_variable("offset", [], initializer=v1.constant_initializer(10.0))
    add_signature(inputs=x, outputs=x + offset)


@CASES.case
def case_update_ops_that_no_input_feeds(ctx):
    """Fine-tuning runs every UPDATE_OPS of the variant, also those no input feeds (a counter,
    statistics of a signature without inputs); a frozen module adds none."""
    tf, _, _ = ctx.imports()
    from hubfast.module_v1 import Module, create_module_spec

    v1 = tf.compat.v1
    spec = create_module_spec(_ticker_fn)
    with tf.Graph().as_default():
        tuned = Module(spec, trainable=True, name="tuned")
        frozen = Module(spec, name="frozen")
        tuned()
        frozen()
        updates = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        assert len(updates) == 1, updates
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            for _ in range(3):
                sess.run(updates)
            assert sess.run(tuned.variable_map["ticks"]) == 3
            assert sess.run(frozen.variable_map["ticks"]) == 0


@CASES.case
def case_wrap_function_from_eager(ctx):
    """The TF2 way to run a TF1 module: build it inside tf.compat.v1.wrap_function, run the
    pruned initializer, then call the function eagerly; both applications share the state."""
    tf, _, _ = ctx.imports()
    from hubfast.module_v1 import Module, create_module_spec

    v1 = tf.compat.v1
    spec = create_module_spec(_offset_fn)
    inits = []

    def body(a, b):
        m = Module(spec, trainable=True)
        inits.append(v1.global_variables_initializer())
        return [m(a), m(b)]

    f = v1.wrap_function(body, [tf.TensorSpec((), tf.float32)] * 2)
    f.prune([], inits)()
    assert [t.numpy() for t in f(1.0, 2.5)] == [11.0, 12.5]


@CASES.case
def case_tf_function_in_graph(ctx):
    """A Module built inside a tf.function traced in a TF1 graph: its variables live in the
    graph (the session's initializer sets them), created once although tf.function traces
    twice."""
    tf, _, _ = ctx.imports()
    from hubfast.module_v1 import Module, create_module_spec

    v1 = tf.compat.v1
    spec = create_module_spec(_offset_fn)
    with tf.Graph().as_default():
        @tf.function
        def apply(a, b):
            m = Module(spec)
            return [m(a), m(b)]

        out = apply(1.0, -1.0)
        assert len(v1.global_variables()) == 1, v1.global_variables()
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            assert sess.run(out) == [11.0, 9.0]


def _write_vocab(path, words):
    with open(path, "w") as f:
        f.write("\n".join(words) + "\n")
    return path


def _words_fn(vocab):
    """ids -> words through a vocabulary file (an asset)."""
    def fn():
        import tensorflow as tf

        from hubfast.module_v1 import add_signature

        ids = tf.compat.v1.placeholder(tf.int64, [None], name="ids")
        table = tf.lookup.StaticHashTable(
            tf.lookup.TextFileInitializer(vocab, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
                                          tf.string, tf.lookup.TextFileIndex.WHOLE_LINE), "?")
        tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.ASSET_FILEPATHS,
                                       tf.constant(vocab, name="vocab_path"))
        add_signature(inputs=ids, outputs=table.lookup(ids))
    return fn


@CASES.case
def case_assets_restored_and_inner_module_assets(ctx):
    """A loaded module's asset paths join the graph's ASSET_FILEPATHS (pointing into the
    module), so a module built around it exports the inner module's vocabulary too: it serves
    after the vocabulary and the inner module are gone."""
    tf, _, _ = ctx.imports()
    import os
    import shutil

    from hubfast.module_v1 import Module, add_signature, create_module_spec

    v1 = tf.compat.v1
    work = ctx.tmp("assets")
    vocab = _write_vocab(str(work / "colours.txt"), ["red", "green", "blue"])
    inner = str(work / "inner")
    with tf.Graph().as_default():
        m = Module(create_module_spec(_words_fn(vocab)))
        with v1.Session() as sess:
            m.export(inner, sess)
    os.remove(vocab)
    inner_vocab = os.path.join(inner, "assets", "colours.txt")
    with tf.Graph().as_default():
        out = Module(inner)(tf.constant([2, 0], tf.int64))
        paths = v1.get_collection(v1.GraphKeys.ASSET_FILEPATHS)
        with v1.Session() as sess:
            sess.run(v1.tables_initializer())
            assert list(sess.run(out)) == [b"blue", b"red"]
            assert paths and {sess.run(p) for p in paths} == {inner_vocab.encode()}, paths

    def outer_fn():
        ids = v1.placeholder(tf.int64, [None], name="ids")
        add_signature(inputs=ids, outputs=tf.strings.upper(Module(inner)(ids)))

    outer = str(work / "outer")
    with tf.Graph().as_default():
        m = Module(create_module_spec(outer_fn))
        with v1.Session() as sess:
            m.export(outer, sess)
    shutil.rmtree(inner)
    assert os.listdir(os.path.join(outer, "assets")) == ["colours.txt"]
    with tf.Graph().as_default():
        out = Module(outer)(tf.constant([1], tf.int64))
        with v1.Session() as sess:
            sess.run(v1.tables_initializer())
            assert list(sess.run(out)) == [b"GREEN"]


@CASES.case
def case_attached_messages(ctx):
    """attach_message in module_fn: per graph variant, the last message for a key wins, it
    survives export and load, and each read is a fresh copy."""
    tf, _, _ = ctx.imports()
    import hubfast as hub

    v1 = tf.compat.v1
    Int64List = tf.train.Int64List

    def fn(level=0):
        x = v1.placeholder(tf.float32, [None])
        hub.add_signature(inputs=x, outputs=x * 2.0)
        hub.attach_message("level", Int64List(value=[-1]))
        hub.attach_message("level", Int64List(value=[level, 7]))
        hub.attach_message("name", tf.train.BytesList(value=[b"doubler"]))

    spec = hub.create_module_spec(fn, [(set(), {"level": 1}), ({"train"}, {"level": 2})])
    assert list(spec.get_attached_message("level", Int64List).value) == [1, 7]
    got = spec.get_attached_message("level", Int64List, tags={"train"})
    assert list(got.value) == [2, 7]
    got.Clear()
    assert list(spec.get_attached_message("level", Int64List, tags={"train"}).value) == [2, 7]
    assert spec.get_attached_message("absent", Int64List) is None
    try:
        spec.get_attached_message("absent", Int64List, required=True)
        raise AssertionError("no KeyError")
    except KeyError:
        pass
    path = str(ctx.tmp("attached") / "m")
    with tf.Graph().as_default():
        m = hub.Module(spec, tags={"train"})
        assert list(m.get_attached_message("level", Int64List).value) == [2, 7]
        with v1.Session() as sess:
            m.export(path, sess)
    loaded = hub.load_module_spec(path)
    assert list(loaded.get_attached_message("name", tf.train.BytesList).value) == [b"doubler"]


@CASES.case
def case_value_errors(ctx):
    """Bad modules and bad exports raise ValueError: a signature of an unsupported type, a
    collection hub.Module cannot restore (unless dropped), a module that requires an unknown
    feature, and spec.export from a checkpoint that lacks a variable or has another shape."""
    tf, _, _ = ctx.imports()
    import os

    import hubfast as hub

    v1 = tf.compat.v1

    def raises(fn, text):
        try:
            fn()
        except ValueError as e:
            assert text in str(e), (text, str(e))
        else:
            raise AssertionError(f"no ValueError ({text})")

    def slices_fn():
        v = v1.placeholder(tf.float32, [None])
        hub.add_signature(inputs=v, outputs=tf.IndexedSlices(v, tf.constant([0])))

    raises(lambda: hub.create_module_spec(slices_fn), "should have one of the types")
    raises(lambda: hub.create_module_spec(lambda: None), "No signatures present")

    def summaries_fn():
        x = v1.placeholder(tf.float32, [])
        v1.add_to_collection("my_notes", tf.constant(1.0))
        hub.add_signature(inputs=x, outputs=x + 1.0)

    raises(lambda: hub.create_module_spec(summaries_fn), "my_notes")
    spec = hub.create_module_spec(summaries_fn, drop_collections=["my_notes"])
    assert spec.get_signature_names() == ["default"]

    needs = str(ctx.tmp("features") / "m")
    os.makedirs(needs)
    with open(os.path.join(needs, "tfhub_module.pb"), "wb") as f:
        f.write(b"\x08\x03" + b"\x12\x0ctime-travel!")  # format 3, a required feature
    raises(lambda: hub.load_module_spec(needs), "time-travel!")

    def dense_fn(units=3):
        x = v1.placeholder(tf.float32, [None, 2])
        w = v1.get_variable("w", [2, units])
        hub.add_signature(inputs=x, outputs=tf.matmul(x, w))

    ckpt = str(ctx.tmp("ckpt") / "model")
    with tf.Graph().as_default():
        with v1.variable_scope("net"):
            v1.get_variable("w", [2, 3])
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            v1.train.Saver().save(sess, ckpt)
    out = ctx.tmp("exports")
    raises(lambda: hub.create_module_spec(dense_fn).export(str(out / "a"), checkpoint_path=ckpt),
           "w is not found in")
    raises(lambda: hub.create_module_spec(dense_fn, [(set(), {"units": 4})]).export(
        str(out / "b"), checkpoint_path=ckpt, name_transform_fn=lambda n: "net/" + n),
        "doesn't match with shape of")
    hub.create_module_spec(dense_fn).export(str(out / "c"), checkpoint_path=ckpt,
                                            name_transform_fn=lambda n: "net/" + n)
    assert sorted(os.listdir(out)) == ["c"], os.listdir(out)


@CASES.case
def case_eval_function_without_inputs(ctx):
    """eval_function_for_module calls a signature that takes no inputs."""
    tf, _, _ = ctx.imports()
    import hubfast as hub

    def fn():
        hub.add_signature(outputs=tf.constant([4.0, 2.0]) * 2.0)

    with hub.eval_function_for_module(hub.create_module_spec(fn)) as f:
        assert list(f()) == [8.0, 4.0]


@CASES.case
def case_ragged_signature(ctx):
    """A signature with a ragged input and a ragged output (plus a dense one): applied to a
    RaggedTensor, through eval_function_for_module, and after export and load."""
    tf, _, _ = ctx.imports()
    import hubfast as hub

    v1 = tf.compat.v1

    def fn():
        words = v1.ragged.placeholder(tf.int64, ragged_rank=1, value_shape=[], name="words")
        bias = v1.placeholder(tf.int64, [], name="bias")
        hub.add_signature(inputs=dict(words=words, bias=bias),
                          outputs=dict(default=words.with_values(words.values * 10 + bias),
                                       lengths=words.row_lengths()))

    spec = hub.create_module_spec(fn)
    assert spec.get_input_info_dict()["words"].is_composite
    rows = [[1, 2, 3], [], [4]]
    path = str(ctx.tmp("ragged") / "m")
    with tf.Graph().as_default():
        m = hub.Module(spec)
        out = m(dict(words=tf.ragged.constant(rows, tf.int64), bias=tf.constant(5, tf.int64)),
                as_dict=True)
        assert isinstance(out["default"], tf.RaggedTensor)
        with v1.Session() as sess:
            got = sess.run(out)
            m.export(path, sess)
    assert got["default"].to_list() == [[15, 25, 35], [], [45]]
    assert got["lengths"].tolist() == [3, 0, 1]
    with hub.eval_function_for_module(path) as f:
        again = f(dict(words=v1.ragged.constant_value([[7], [8, 9]]), bias=0))
    assert again.to_list() == [[70], [80, 90]]


@CASES.case
def case_partitioned_variables(ctx):
    """A variable split in parts (a partitioner): variable_map lists its parts in order, the
    in-memory spec starts from the initializer, and the exported module restores each part
    from its slice of the checkpoint."""
    tf, _, _ = ctx.imports()
    np = __import__("numpy")
    import hubfast as hub

    v1 = tf.compat.v1
    table = np.arange(14, dtype=np.float32).reshape(7, 2)

    def fn():
        w = v1.get_variable("table", initializer=tf.constant(table),
                            partitioner=v1.fixed_size_partitioner(3))
        hub.add_signature(outputs=tf.convert_to_tensor(w) * 2.0)

    path = str(ctx.tmp("parts") / "m")
    with tf.Graph().as_default():
        m = hub.Module(hub.create_module_spec(fn), name="emb")
        parts = m.variable_map["table"]
        assert [p.name for p in parts] == [f"emb/table/part_{i}:0" for i in range(3)]
        assert len(m.variables) == 3
        out = m()
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            np.testing.assert_allclose(sess.run(out), table * 2)
            sess.run(parts[0].assign(parts[0] + 100.0))
            m.export(path, sess)
    want = table * 2
    want[:3] += 200.0
    with tf.Graph().as_default():
        out = hub.Module(path)()
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            np.testing.assert_allclose(sess.run(out), want)


def _placed_fn():
    """A module whose ops carry colocation constraints: `scaled` sits with the variable
    `gain`, `shifted` with the input `signal`, `mixed` with both; `gain_copy` (a ref
    variable's read) with its variable."""
    import tensorflow as tf

    from hubfast.module_v1 import add_signature

    v1 = tf.compat.v1
    gain = v1.get_variable("gain", [], initializer=v1.constant_initializer(3.0),
                           use_resource=False)
    signal = v1.placeholder(tf.float32, [], name="signal")
    with v1.colocate_with(gain):
        scaled = tf.multiply(gain.value(), 2.0, name="scaled")
    with v1.colocate_with(signal):
        shifted = tf.add(signal, 1.0, name="shifted")
    with v1.colocate_with(gain), v1.colocate_with(signal):
        mixed = tf.add(signal, gain.value(), name="mixed")
    add_signature(inputs=signal, outputs=dict(scaled=scaled, shifted=shifted, mixed=mixed,
                                              default=gain.value()))


@CASES.case
def case_colocation_restated_in_consumer_graph(ctx):
    """Colocation constraints of the module graph refer to the consumer's ops once applied:
    the Module's variable for state, the tensor fed for an input (its own placement), both
    merged; an exported and reloaded module keeps them."""
    tf, _, _ = ctx.imports()
    import hubfast as hub

    v1 = tf.compat.v1
    spec = hub.create_module_spec(_placed_fn)
    path = str(ctx.tmp("placed") / "m")
    with tf.Graph().as_default():
        left = tf.constant(0, name="left")
        right = tf.constant(0, name="right")
        with v1.colocate_with(left), v1.colocate_with(right):
            feed = tf.constant(5.0, name="feed")
        plain = tf.constant(7.0, name="plain")
        m = hub.Module(spec, name="placed")
        out = m(feed, as_dict=True)
        assert out["scaled"].op.colocation_groups() == [b"loc:@placed/gain"]
        assert out["shifted"].op.colocation_groups() == [b"loc:@left", b"loc:@right"]
        assert out["mixed"].op.colocation_groups() == [
            b"loc:@left", b"loc:@placed/gain", b"loc:@right"]
        again = m(plain, as_dict=True)
        assert again["shifted"].op.colocation_groups() == [b"loc:@plain"]
        assert again["default"].op.colocation_groups() == [b"loc:@placed/gain"]
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            assert sess.run(out) == dict(scaled=6.0, shifted=6.0, mixed=8.0, default=3.0)
            m.export(path, sess)
    with tf.Graph().as_default():
        out = hub.Module(path, name="reloaded")(tf.constant(1.0), as_dict=True)
        assert out["default"].op.colocation_groups() == [b"loc:@reloaded/gain"]
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            assert sess.run(out["mixed"]) == 4.0


@CASES.case
def case_colocation_rejected_in_module_fn(ctx):
    """A signature input or a variable placed by tf.colocate_with() next to an ordinary op
    cannot be restated when the module is applied: create_module_spec says which. A variable
    placed next to another variable keeps that placement in the consumer's graph."""
    tf, _, _ = ctx.imports()
    import hubfast as hub

    v1 = tf.compat.v1

    def input_fn():
        anchor = tf.constant(1.0, name="anchor")
        with v1.colocate_with(anchor):
            x = v1.placeholder(tf.float32, name="x")
        hub.add_signature(inputs=x, outputs=x * 2.0)

    def state_fn():
        anchor = tf.constant(1.0, name="anchor")
        with v1.colocate_with(anchor):
            w = v1.get_variable("w", [], initializer=v1.ones_initializer())
        hub.add_signature(outputs=w * 2.0)

    def state_with_state_fn():
        w = v1.get_variable("w", [], initializer=v1.ones_initializer())
        with v1.colocate_with(w):
            b = v1.get_variable("b", [], initializer=v1.ones_initializer())
        hub.add_signature(outputs=w + b)

    with pytest.raises(ValueError, match=r"(?s)input 'default'.*colocate.*loc:@anchor"):
        hub.create_module_spec(input_fn)
    with pytest.raises(ValueError, match=r"(?s)state node 'w'.*colocate.*loc:@anchor"):
        hub.create_module_spec(state_fn)
    with tf.Graph().as_default():  # state next to state is fine, and stays so
        m = hub.Module(hub.create_module_spec(state_with_state_fn), name="pair")
        assert m.variable_map["b"].op.colocation_groups() == [b"loc:@pair/w"]
        assert m.variable_map["w"].op.colocation_groups() == [b"loc:@pair/w"]


def _halves_fn():
    """Both halves of one tf.split are the signature's inputs."""
    import tensorflow as tf

    from hubfast.module_v1 import add_signature

    v1 = tf.compat.v1
    lo, hi = tf.split(v1.placeholder(tf.float32, [4], name="whole"), 2, name="halves")
    with v1.colocate_with(lo):
        total = tf.add(lo, hi, name="total")
    add_signature(inputs=dict(lo=lo, hi=hi), outputs=total)
    add_signature("lo_only", inputs=dict(lo=lo), outputs=total)


@CASES.case
def case_colocation_with_multi_output_input(ctx):
    """Inputs that are outputs of one op: applying works while the tensors fed for them are
    placed alike; otherwise a ValueError names the ambiguity and the application adds no op.
    find_signature_inputs_from_multivalued_ops lists such inputs, sparse ones by part."""
    tf, _, _ = ctx.imports()
    import hubfast as hub
    from hubfast.module_spec import find_signature_inputs_from_multivalued_ops

    v1 = tf.compat.v1
    spec = hub.create_module_spec(_halves_fn)
    with tf.Graph().as_default() as g:
        a = tf.constant([1.0, 2.0], name="a")
        with v1.colocate_with(a):
            b = tf.constant([10.0, 20.0], name="b")
        c = tf.constant([100.0, 200.0], name="c")
        m = hub.Module(spec, name="m")
        total = m(dict(lo=a, hi=b))
        assert total.op.colocation_groups() == [b"loc:@a"]
        before = len(g.get_operations())
        with pytest.raises(ValueError, match=r"(?s)'loc:@m_apply_default_1/halves' .*"
                                             r"\[b'loc:@a'\] vs \[b'loc:@c'\]"):
            m(dict(lo=a, hi=c))
        with pytest.raises(ValueError, match=r"(?s)\[b'loc:@a'\] vs "
                                             r"\[b'loc:@m_apply_lo_only/halves'\]"):
            m(dict(lo=a), signature="lo_only")
        assert len(g.get_operations()) == before, "a failed application left ops behind"
        with v1.Session() as sess:
            assert sess.run(total).tolist() == [11.0, 22.0]

    with tf.Graph().as_default():
        first, second = tf.unstack(tf.constant([[1, 2], [3, 4]]), name="rows")
        single = tf.constant([5, 6], name="single")
        sparse = tf.sparse.split(tf.SparseTensor([[0, 0], [1, 1]], [7, 8], [2, 2]), 2, axis=0,
                                 name="parts")[1]
        msg = find_signature_inputs_from_multivalued_ops(
            dict(b=second, a=first, c=single, d=sparse))
        assert msg.endswith("Affected inputs: a='rows:0', b='rows:1', "
                            "d.indices='parts:1', d.values='parts:3', "
                            "d.dense_shape='parts:5'"), msg
        assert find_signature_inputs_from_multivalued_ops(dict(c=single)) is None


# ---------------------------------------------------------------------------
# pytest side
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_v1_graphs_session(request, tmp_path_factory):
    run = CASES.session(request, tmp_path_factory.mktemp("module_v1_graphs_cases"))
    yield run
    run.wait()


@pytest.mark.parametrize("name", CASES.shared_names())
def test_case(module_v1_graphs_session, name):
    module_v1_graphs_session.check(name)
