"""hub.Module beyond one plain TF1 graph: update ops that no input feeds, a module built inside
tf.compat.v1.wrap_function (eager caller) or a tf.function traced in a TF1 graph, and the
error types, assets and attached messages of the TF1 API (hubfast.module_v1).

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
