"""hubfast.KerasLayer under tf_keras (``TF_USE_LEGACY_KERAS=1``), with parity against
tensorflow_hub 0.16.1's KerasLayer on the same models.

The cases run in one worker process with ``TF_USE_LEGACY_KERAS=1`` (it must be set before
TensorFlow is imported), see ``tf_helpers.py``; pytest reports each case on its own. Models
are real SavedModels written by the worker (``hubfast.testing.models``).
"""
from __future__ import annotations

import pytest

import tf_helpers as th

pytestmark = [pytest.mark.tf, pytest.mark.slow]

CASES = th.Cases(__file__, env={"TF_USE_LEGACY_KERAS": "1"})

# The TF1 module of hubfast.testing.models: default = x @ W + B.
W = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
B = [0.5, -0.5, 1.0]


def _both(hub):
    """[(label, module)] for hubfast and tensorflow_hub (imported here, in the worker)."""
    import tensorflow_hub

    return [("hubfast", hub), ("tensorflow_hub", tensorflow_hub)]


def _np(x):
    import numpy as np

    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def _close(a, b, rtol=1e-5, atol=1e-6):
    import numpy as np

    return np.allclose(_np(a), _np(b), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# Cases (run in the worker)
# ---------------------------------------------------------------------------


@CASES.case
def case_uses_tf_keras(ctx):
    tf, keras, hub = ctx.imports()
    import tf_keras

    from hubfast import keras_layer

    assert not keras_layer.IS_KERAS_3, keras_layer.KERAS_VERSION
    assert keras is tf_keras
    assert issubclass(hub.tf_keras.KerasLayer, tf_keras.layers.Layer)
    layer = hub.KerasLayer(ctx.model("mul"))
    assert type(layer) is hub.tf_keras.KerasLayer and isinstance(layer, hub.KerasLayer)
    model = tf_keras.Sequential([layer])
    assert _close(model(tf.constant([1.0, 3.0])), [2.0, 6.0])


@CASES.case
def case_explicit_keras3_layer_under_legacy_keras(ctx):
    """tf.keras is tf_keras here, yet code that names hubfast.keras.KerasLayer gets a Keras 3
    layer for its keras.Sequential."""
    tf, _, hub = ctx.imports()
    import keras as keras3

    layer = hub.keras.KerasLayer(ctx.model("mul"))
    assert isinstance(layer, keras3.layers.Layer) and isinstance(layer, hub.KerasLayer)
    model = keras3.Sequential([keras3.Input(shape=(2,)), layer])
    assert _close(model(tf.constant([[1.0, 3.0]])), [[2.0, 6.0]])


@CASES.case
def case_seed_mul(ctx):
    """The MyMulModel example of the "Exporting a SavedModel" page, line for line."""
    tf, keras, hub = ctx.imports()
    seen = {}
    for label, H in _both(hub):
        layer = H.KerasLayer(ctx.model("mul"))
        out = _np(layer([10.0, 20.0]))
        frozen = dict(tw=len(layer.trainable_weights), ntw=len(layer.non_trainable_weights),
                      losses=[float(l) for l in layer.losses])
        layer.trainable = True
        tw = [float(w.numpy()) for w in layer.trainable_weights]
        losses = [float(l) for l in layer.losses]
        seen[label] = (out, frozen, tw, losses)
        if label == "hubfast":
            assert out.tolist() == [20.0, 40.0]
            assert tw == [2.0]
            assert len(losses) == 1 and abs(losses[0] - 0.004) < 1e-7, losses
            # The layer's weight is the SavedModel's own variable, not a copy.
            assert layer.trainable_weights[0] is layer.resolved_object.v
    ours, theirs = seen["hubfast"], seen["tensorflow_hub"]
    assert ours[0].tolist() == theirs[0].tolist()
    assert ours[1] == theirs[1], (ours[1], theirs[1])
    assert ours[2] == theirs[2]
    assert _close(ours[3], theirs[3])


@CASES.case
def case_text_embedding_sequential_fit(ctx):
    """The tf2_saved_model page's text classifier: embedding layer + Dense, one epoch."""
    tf, keras, hub = ctx.imports()
    x = tf.constant(["the quick brown fox", "hello world", "lazy dog jumps", "unknown words"])
    y = tf.constant([[1.0], [0.0], [1.0], [0.0]])
    seen = {}
    for label, H in _both(hub):
        embed = H.KerasLayer(ctx.model("text"), input_shape=[], dtype=tf.string)
        model = keras.Sequential([embed, keras.layers.Dense(1, kernel_initializer="ones")])
        model.compile(keras.optimizers.SGD(0.1), "mse")
        obj = embed.resolved_object
        emb0 = obj.embeddings.numpy().copy()
        kernel0 = model.layers[-1].kernel.numpy().copy()
        direct = obj(x)
        assert _close(embed(x), direct)
        hist = model.fit(x, y, epochs=1, batch_size=4, verbose=0)
        seen[label] = dict(pred=_np(model.predict(x, verbose=0)), loss=hist.history["loss"],
                           shape=tuple(model.output_shape),
                           tw=len(embed.trainable_weights), ntw=len(embed.non_trainable_weights))
        assert _close(obj.embeddings, emb0), "a frozen layer's embeddings changed"
        assert not _close(model.layers[-1].kernel, kernel0), "Dense did not train"
        assert seen[label]["shape"] == (None, 1)
        assert seen[label]["tw"] == 0 and seen[label]["ntw"] == 1
    ours, theirs = seen["hubfast"], seen["tensorflow_hub"]
    assert _close(ours["pred"], theirs["pred"])
    assert _close(ours["loss"], theirs["loss"])
    assert (ours["tw"], ours["ntw"]) == (theirs["tw"], theirs["ntw"])


def _training_expectations(obj, x):
    """(training=False output, training=True output) of write_training_model, in NumPy."""
    import numpy as np

    y = np.asarray(x) @ obj.kernel.numpy() + obj.bias.numpy()
    return y - obj.moving_mean.numpy(), 0.5 * y


@CASES.case
def case_training_model_fine_tuning(ctx):
    """trainable=True: fit updates the SavedModel's variables, passes training=True, and
    adds its regularization loss; the raw object's outputs change accordingly."""
    import numpy as np

    tf, keras, hub = ctx.imports()
    x = np.arange(32, dtype=np.float32).reshape(8, 4) / 10.0
    y = np.ones((8, 1), np.float32)
    seen = {}
    for label, H in _both(hub):
        layer = H.KerasLayer(ctx.model("training"), trainable=True, input_shape=[4])
        obj = layer.resolved_object
        infer, train = _training_expectations(obj, x)
        assert _close(layer(x), infer) and _close(layer(x, training=True), train)
        obj.moving_mean.assign(tf.zeros_like(obj.moving_mean))  # undo that call's update
        model = keras.Sequential([layer, keras.layers.Dense(1, kernel_initializer="ones")])
        model.compile(keras.optimizers.SGD(0.01), "mse")
        k0, b0 = obj.kernel.numpy().copy(), obj.bias.numpy().copy()
        raw0 = _np(obj(x))
        want_k, want_b = th.expected_sgd_step(obj, x, y, 0.01)
        losses = [float(l) for l in model.losses]
        assert len(losses) == 1 and abs(losses[0] - 0.01 * float(np.sum(k0 ** 2))) < 1e-5
        hist = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        # training=True reached the SavedModel: its moving mean moved by 0.1 * mean(y).
        expected_mm = 0.1 * np.mean(x @ k0 + b0, axis=0)
        assert _close(obj.moving_mean, expected_mm), (obj.moving_mean.numpy(), expected_mm)
        assert not _close(obj.kernel, k0) and not _close(obj.bias, b0), "kernel/bias unchanged"
        # The update itself (the regularization loss makes ~0.5% of it) matches the tape's.
        assert _close(obj.kernel.numpy() - k0, want_k - k0, rtol=1e-3)
        assert _close(obj.bias.numpy() - b0, want_b - b0, rtol=1e-3)
        assert not _close(obj(x), raw0), "the raw object's output did not change"
        assert layer.trainable_weights[0] is obj.kernel
        seen[label] = dict(kernel=obj.kernel.numpy(), mm=obj.moving_mean.numpy(),
                           loss=hist.history["loss"], losses=[float(l) for l in model.losses],
                           tw=len(layer.trainable_weights), ntw=len(layer.non_trainable_weights))
        assert (seen[label]["tw"], seen[label]["ntw"]) == (2, 1)
    ours, theirs = seen["hubfast"], seen["tensorflow_hub"]
    for key in ("kernel", "mm", "loss", "losses"):
        assert _close(ours[key], theirs[key]), (key, ours[key], theirs[key])
    assert (ours["tw"], ours["ntw"]) == (theirs["tw"], theirs["ntw"])


@CASES.case
def case_training_model_frozen(ctx):
    """trainable=False: nothing of the SavedModel changes, training=False is passed even in
    fit, and its regularization loss counts as 0."""
    import numpy as np

    tf, keras, hub = ctx.imports()
    x = np.arange(32, dtype=np.float32).reshape(8, 4) / 10.0
    y = np.ones((8, 1), np.float32)
    seen = {}
    for label, H in _both(hub):
        layer = H.KerasLayer(ctx.model("training"), input_shape=[4])
        obj = layer.resolved_object
        infer, _ = _training_expectations(obj, x)
        assert _close(layer(x, training=True), infer)  # frozen: inference mode
        model = keras.Sequential([layer, keras.layers.Dense(1, kernel_initializer="ones")])
        model.compile(keras.optimizers.SGD(0.01), "mse")
        before = [v.numpy().copy() for v in obj.variables]
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        assert all(_close(v, b) for v, b in zip(obj.variables, before))
        seen[label] = dict(losses=[float(l) for l in model.losses],
                           tw=len(layer.trainable_weights), ntw=len(layer.non_trainable_weights),
                           pred=_np(model.predict(x, verbose=0)))
        assert seen[label]["losses"] == [0.0]
        assert (seen[label]["tw"], seen[label]["ntw"]) == (0, 3)
    ours, theirs = seen["hubfast"], seen["tensorflow_hub"]
    assert ours["losses"] == theirs["losses"]
    assert (ours["tw"], ours["ntw"]) == (theirs["tw"], theirs["ntw"])
    assert _close(ours["pred"], theirs["pred"])


@CASES.case
def case_signature_output_key(ctx):
    tf, keras, hub = ctx.imports()
    x = tf.constant(["hello world", "the fox"])
    seen = {}
    for label, H in _both(hub):
        layer = H.KerasLayer(ctx.model("text"), signature="serving_default",
                             output_key="embedding")
        out = layer({"sentences": x})
        expected = layer.resolved_object.signatures["serving_default"](sentences=x)
        assert _close(out, expected["embedding"])
        assert not _close(out, expected["default"])
        assert _close(tf.norm(out, axis=-1), [1.0, 1.0])
        seen[label] = _np(out)
    assert _close(seen["hubfast"], seen["tensorflow_hub"])


@CASES.case
def case_signature_outputs_as_dict(ctx):
    import numpy as np

    tf, keras, hub = ctx.imports()
    apples = np.array([[1.0, 2.0]], np.float32)
    oranges = np.array([[0.5, -1.0]], np.float32)
    seen = {}
    for label, H in _both(hub):
        layer = H.KerasLayer(ctx.model("tf1"), signature="fruit_to_pet",
                             signature_outputs_as_dict=True)
        out = layer({"apples": tf.constant(apples), "oranges": tf.constant(oranges)})
        assert sorted(out) == ["cats", "dogs"]
        assert _close(out["cats"], apples @ np.array(W) + np.array(B))
        assert _close(out["dogs"], oranges @ np.array(W) - np.array(B))
        # Functional model with dict inputs and dict outputs.
        inputs = {k: keras.Input(shape=(2,), name=k) for k in ("apples", "oranges")}
        model = keras.Model(inputs, layer(inputs))
        pred = model.predict({"apples": apples, "oranges": oranges}, verbose=0)
        assert _close(pred["dogs"], out["dogs"])
        seen[label] = {k: _np(v) for k, v in out.items()}
    assert all(_close(seen["hubfast"][k], seen["tensorflow_hub"][k]) for k in ("cats", "dogs"))


@CASES.case
def case_tf1_hub_module_default_signature(ctx):
    import numpy as np

    tf, keras, hub = ctx.imports()
    x = np.array([[1.0, 1.0], [2.0, -1.0]], np.float32)
    seen = {}
    for label, H in _both(hub):
        layer = H.KerasLayer(ctx.model("tf1"))  # TF1 format: empty tags, "default" signature
        out = layer(tf.constant(x))
        assert _close(out, x @ np.array(W) + np.array(B))
        inp = keras.Input(shape=(2,))
        model = keras.Model(inp, keras.layers.Dense(1)(layer(inp)))
        assert tuple(model.layers[1].output.shape) == (None, 3)
        layer.trainable = True
        with np.testing.assert_raises(ValueError):
            layer(tf.constant(x))
        cfg = layer.get_config()
        seen[label] = (_np(out), cfg["signature"], cfg["output_key"])
    assert _close(seen["hubfast"][0], seen["tensorflow_hub"][0])
    assert seen["hubfast"][1:] == seen["tensorflow_hub"][1:] == ("default", "default")


@CASES.case
def case_arguments(ctx):
    tf, keras, hub = ctx.imports()
    seen = {}
    for label, H in _both(hub):
        layer = H.KerasLayer(ctx.model("scaled"), arguments={"scale": 3.0})
        out = layer(tf.constant([1.0, 2.0]))
        sig = H.KerasLayer(ctx.model("scaled"), arguments={"scale": 0.5},
                           signature="serving_default", output_key="out")
        sig_out = sig({"x": tf.constant([1.0, 2.0])})
        assert _close(out, [6.0, 12.0]) and _close(sig_out, [1.0, 2.0])
        assert layer.get_config()["arguments"] == {"scale": 3.0}
        seen[label] = (_np(out), _np(sig_out))
    assert all(_close(a, b) for a, b in zip(seen["hubfast"], seen["tensorflow_hub"]))


@CASES.case
def case_invalid_combinations(ctx):
    """The same invalid uses raise the same exception types as in tensorflow_hub."""
    tf, keras, hub = ctx.imports()

    def outcomes(H):
        return th.invalid_keras_layer_outcomes(H, tf, ctx.model("text"), ctx.model("mul"))

    ours = outcomes(hub)
    import tensorflow_hub

    theirs = outcomes(tensorflow_hub)
    assert ours == theirs, (ours, theirs)
    assert ours["config of a callable"] == "NotImplementedError"
    assert all(v == "ValueError" for k, v in ours.items() if k != "config of a callable"), ours
    with pytest.raises(NotImplementedError, match="string `handle`"):
        hub.KerasLayer(hub.load(ctx.model("mul"))).get_config()


@CASES.case
def case_config_round_trip(ctx):
    """get_config keeps what tensorflow_hub keeps, plus tags; from_config rebuilds the layer
    (loading the handle again); a .keras file round-trips."""
    import json

    import numpy as np

    tf, keras, hub = ctx.imports()
    import tensorflow_hub

    specs = [
        (dict(handle=ctx.model("mul"), output_shape=[2]), tf.constant([[1.0, 2.0]])),
        (dict(handle=ctx.model("training"), trainable=True, tags=["serve"]),
         tf.ones([2, 4])),
        (dict(handle=ctx.model("text"), signature="serving_default", output_key="embedding"),
         {"sentences": tf.constant(["hello world"])}),
        (dict(handle=ctx.model("tf1"), tags=[], signature="fruit_to_pet",
              signature_outputs_as_dict=True),
         {"apples": tf.ones([1, 2]), "oranges": tf.ones([1, 2])}),
        (dict(handle=ctx.model("scaled"), arguments={"scale": 2.0}), tf.constant([1.0])),
    ]
    for kwargs, x in specs:
        ours = hub.KerasLayer(**kwargs)
        theirs = tensorflow_hub.KerasLayer(**kwargs)
        config = ours.get_config()
        json.dumps(config)
        extra = {"tags"} if "tags" in kwargs else set()
        assert set(config) == set(theirs.get_config()) | extra, (config, theirs.get_config())
        if "tags" in kwargs:
            assert config["tags"] == kwargs["tags"]
        clone = hub.KerasLayer.from_config(config)
        assert clone.get_config() == config
        assert clone.resolved_object is not ours.resolved_object
        a, b = ours(x), clone(x)
        tf.nest.assert_same_structure(a, b)
        assert all(_close(p, q) for p, q in zip(tf.nest.flatten(a), tf.nest.flatten(b)))
    # A whole model in the Keras v3 format (tf_keras's), found through the registration.
    layer = hub.KerasLayer(ctx.model("training"), trainable=True, tags=["serve"])
    inp = keras.Input(shape=(4,))
    model = keras.Model(inp, keras.layers.Dense(1)(layer(inp)))
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x = np.ones((4, 4), np.float32)
    model.fit(x, np.zeros((4, 1), np.float32), verbose=0)
    path = str(ctx.tmp("keras") / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.layers[1]) is hub.tf_keras.KerasLayer
    assert loaded.layers[1].get_config()["tags"] == ["serve"]
    assert _close(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@CASES.case
def case_output_shape(ctx):
    tf, keras, hub = ctx.imports()
    import tensorflow_hub

    seen = {}
    for label, H in (("hubfast", hub), ("tensorflow_hub", tensorflow_hub)):
        layer = H.KerasLayer(ctx.model("mul"), output_shape=[3])
        shape = tuple(layer.compute_output_shape((None, 3)).as_list())
        inp = keras.Input(shape=(3,))
        out = layer(inp)
        seen[label] = (shape, tuple(out.shape))
        assert seen[label] == ((None, 3), (None, 3))
    assert seen["hubfast"] == seen["tensorflow_hub"]


@CASES.case
def case_handles_archive_and_pathlike(ctx):
    """hubfast handles: a local .tar.gz (extracted into the cache) and an os.PathLike."""
    import os
    from pathlib import Path

    from hubfast.testing import models

    tf, keras, hub = ctx.imports()
    archive = models.pack_tar(ctx.model("mul"), str(ctx.tmp("archive") / "mul.tar.gz"), "gz")
    layer = hub.KerasLayer(archive)
    assert _close(layer(tf.constant([1.0, 2.0])), [2.0, 4.0])
    assert os.listdir(os.environ["TFHUB_CACHE_DIR"]), "the archive was not extracted into the cache"
    assert layer.get_config()["handle"] == archive
    layer2 = hub.KerasLayer(Path(ctx.model("mul")))
    assert layer2.get_config()["handle"] == ctx.model("mul")
    assert _close(layer2(tf.constant([3.0])), [6.0])


# ---------------------------------------------------------------------------
# pytest side
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def legacy_session(request, tmp_path_factory):
    run = CASES.session(request, tmp_path_factory.mktemp("tf_keras_cases"))
    yield run
    run.wait()


@pytest.mark.parametrize("name", CASES.shared_names())
def test_case(legacy_session, name):
    legacy_session.check(name)
