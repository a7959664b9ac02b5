"""hubfast.KerasLayer under Keras 3 (TensorFlow backend): a real ``keras.layers.Layer`` whose
weights are the SavedModel's own variables.

The cases run in a worker process (see ``tf_helpers.py``) with the default Keras; pytest
reports each case on its own. Cases that need a process of their own (tf.distribute with two
logical CPUs, memory measurements) run in fresh workers; the ``.keras`` round trip loads the
file in a fresh process with an empty cache, from a loopback TF Hub server.
"""
from __future__ import annotations

import sys

import pytest

import tf_helpers as th

pytestmark = [pytest.mark.tf, pytest.mark.slow]

CASES = th.Cases(__file__)

# The TF1 module of hubfast.testing.models: default = x @ W + B.
W = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
B = [0.5, -0.5, 1.0]
BIG_MODEL_BYTES = 64 << 20


def _np(x):
    import numpy as np

    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def _close(a, b, rtol=1e-5, atol=1e-6):
    import numpy as np

    return np.allclose(_np(a), _np(b), rtol=rtol, atol=atol)


def _training_expectations(obj, x):
    """(training=False output, training=True output) of write_training_model, in NumPy."""
    import numpy as np

    y = np.asarray(x) @ obj.kernel.numpy() + obj.bias.numpy()
    return y - obj.moving_mean.numpy(), 0.5 * y


# ---------------------------------------------------------------------------
# Cases (run in the worker)
# ---------------------------------------------------------------------------


@CASES.case
def case_is_a_keras3_layer_over_the_savedmodel_variables(ctx):
    import numpy as np

    tf, keras, hub = ctx.imports()
    from hubfast import keras_layer

    assert keras_layer.IS_KERAS_3 and keras.__version__.startswith("3."), keras.__version__
    assert issubclass(hub.keras.KerasLayer, keras.layers.Layer)
    layer = hub.KerasLayer(ctx.model("training"), trainable=True)
    assert type(layer) is hub.keras.KerasLayer and isinstance(layer, hub.KerasLayer)
    obj = layer.resolved_object
    # Every weight is a keras.Variable whose storage is the SavedModel's tf.Variable.
    assert all(isinstance(w, keras.Variable) for w in layer.weights)
    assert len(layer.trainable_weights) == 2 and len(layer.non_trainable_weights) == 1
    assert all(w.value is v for w, v in zip(layer.trainable_weights, [obj.kernel, obj.bias]))
    assert layer.non_trainable_weights[0].value is obj.moving_mean
    # Writes through one are visible through the other.
    kernel_w = layer.trainable_weights[0]
    kernel_w.assign(np.full((4, 3), 0.5, np.float32))
    assert _close(obj.kernel, np.full((4, 3), 0.5))
    obj.kernel.assign(np.full((4, 3), 0.25, np.float32))
    assert _close(kernel_w, np.full((4, 3), 0.25))
    # Gradients w.r.t. the Keras weights are gradients w.r.t. the SavedModel's variables.
    x = tf.ones([2, 4])
    with tf.GradientTape(persistent=True) as tape:
        y = tf.reduce_sum(layer(x, training=False))
    g_keras = tape.gradient(y, layer.trainable_weights)
    g_tf = tape.gradient(y, [obj.kernel, obj.bias])
    assert all(g is not None for g in g_keras)
    assert all(_close(a, b) for a, b in zip(g_keras, g_tf))


@CASES.case
def case_seed_mul(ctx):
    """The MyMulModel example of the "Exporting a SavedModel" page, line for line."""
    tf, keras, hub = ctx.imports()
    layer = hub.KerasLayer(ctx.model("mul"))
    assert _np(layer([10.0, 20.0])).tolist() == [20.0, 40.0]
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 1
    assert layer.losses == []  # frozen: the regularization loss does not count
    layer.trainable = True
    assert [float(w.numpy()) for w in layer.trainable_weights] == [2.0]
    losses = [float(l) for l in layer.losses]
    assert len(losses) == 1 and abs(losses[0] - 0.004) < 1e-7, losses
    assert layer.trainable_weights[0].value is layer.resolved_object.v


@CASES.case
def case_text_embedding_sequential_fit(ctx):
    """The tf2_saved_model page's text classifier, in a keras.Sequential, one epoch."""
    import numpy as np

    tf, keras, hub = ctx.imports()
    x = tf.constant(["the quick brown fox", "hello world", "lazy dog jumps", "unknown words"])
    y = tf.constant([[1.0], [0.0], [1.0], [0.0]])
    preds = []
    for first in ("keras.Input", "input_shape kwarg"):
        if first == "keras.Input":
            embed = hub.KerasLayer(ctx.model("text"))
            layers = [keras.Input(shape=(), dtype="string"), embed]
        else:  # tensorflow_hub's documented idiom
            embed = hub.KerasLayer(ctx.model("text"), input_shape=[], dtype=tf.string)
            layers = [embed]
        model = keras.Sequential(layers + [keras.layers.Dense(1, kernel_initializer="ones")])
        assert tuple(model.output_shape) == (None, 1), first
        model.compile(keras.optimizers.SGD(0.1), "mse")
        obj = embed.resolved_object
        emb0 = obj.embeddings.numpy().copy()
        kernel0 = model.layers[-1].kernel.numpy().copy()
        assert _close(embed(x), obj(x))
        model.fit(x, y, epochs=1, batch_size=4, verbose=0)
        assert _close(obj.embeddings, emb0), "a frozen layer's embeddings changed"
        assert not _close(model.layers[-1].kernel, kernel0), "Dense did not train"
        assert len(embed.trainable_weights) == 0 and len(embed.non_trainable_weights) == 1
        preds.append(_np(model.predict(x, verbose=0)))
    assert _close(preds[0], preds[1])
    # Fine-tuning the embedding: sparse gradients (a gather inside the SavedModel) update
    # exactly the rows of the tokens seen.
    embed = hub.KerasLayer(ctx.model("text"), trainable=True)
    model = keras.Sequential([keras.Input(shape=(), dtype="string"), embed, keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    emb0 = embed.resolved_object.embeddings.numpy().copy()
    model.fit(tf.constant(["hello world", "the fox"]), y[:2], epochs=1, verbose=0)
    changed = np.nonzero(np.abs(embed.resolved_object.embeddings.numpy() - emb0).sum(axis=1))[0]
    assert changed.tolist() == [0, 3, 8, 9], changed  # the, fox, hello, world


def _check_fine_tuning(tf, keras, model, layer, x, y, lr=0.01):
    """Shared by the functional and subclassed cases: one fit step updates the SavedModel's
    variables exactly as a bare GradientTape would, with training=True and the
    regularization loss."""
    import numpy as np

    obj = layer.resolved_object
    k0, b0 = obj.kernel.numpy().copy(), obj.bias.numpy().copy()
    raw0 = _np(obj(x))
    losses = [float(l) for l in model.losses]
    assert len(losses) == 1 and abs(losses[0] - 0.01 * float(np.sum(k0 ** 2))) < 1e-5, losses
    want_k, want_b = th.expected_sgd_step(obj, x, y, lr)
    model.compile(keras.optimizers.SGD(lr), "mse")
    model.fit(x, y, epochs=1, batch_size=len(x), verbose=0)
    assert _close(obj.moving_mean, 0.1 * np.mean(x @ k0 + b0, axis=0)), "training=True not passed"
    assert not _close(obj.kernel, k0) and not _close(obj.bias, b0), "the SavedModel did not train"
    # The update itself (the regularization loss makes ~0.5% of it) matches the tape's.
    assert _close(_np(obj.kernel) - k0, want_k - k0, rtol=1e-3), (obj.kernel.numpy(), want_k)
    assert _close(_np(obj.bias) - b0, want_b - b0, rtol=1e-3), (obj.bias.numpy(), want_b)
    assert not _close(obj(x), raw0), "the raw object's output did not change"
    assert (len(layer.trainable_weights), len(layer.non_trainable_weights)) == (2, 1)


@CASES.case
def case_training_model_fine_tuning_functional(ctx):
    import numpy as np

    tf, keras, hub = ctx.imports()
    x = np.arange(32, dtype=np.float32).reshape(8, 4) / 10.0
    y = np.ones((8, 1), np.float32)
    layer = hub.KerasLayer(ctx.model("training"), trainable=True)
    infer, train = _training_expectations(layer.resolved_object, x)
    assert _close(layer(x), infer) and _close(layer(x, training=True), train)
    layer.resolved_object.moving_mean.assign(tf.zeros([3]))  # undo that call's update
    inp = keras.Input(shape=(4,))
    model = keras.Model(inp, keras.layers.Dense(1, kernel_initializer="ones")(layer(inp)))
    assert tuple(model.layers[1].output.shape) == (None, 3)
    _check_fine_tuning(tf, keras, model, layer, x, y)
    # "Re-exporting the fine-tuning result" (tf2_saved_model page): save the loaded object.
    export = str(ctx.tmp("export"))
    tf.saved_model.save(layer.resolved_object, export)
    again = hub.load(export)
    assert _close(again.kernel, layer.resolved_object.kernel)
    assert _close(again(x), layer.resolved_object(x))


@CASES.case
def case_training_model_fine_tuning_subclassed(ctx):
    import numpy as np

    tf, keras, hub = ctx.imports()
    x = np.arange(32, dtype=np.float32).reshape(8, 4) / 10.0
    y = np.ones((8, 1), np.float32)

    class Classifier(keras.Model):
        def __init__(self, handle):
            super().__init__()
            self.hub = hub.KerasLayer(handle, trainable=True)
            self.head = keras.layers.Dense(1, kernel_initializer="ones")

        def call(self, inputs, training=None):
            return self.head(self.hub(inputs, training=training))

    model = Classifier(ctx.model("training"))
    model(x[:1])  # builds the head
    model.hub.resolved_object.moving_mean.assign(tf.zeros([3]))
    _check_fine_tuning(tf, keras, model, model.hub, x, y)


@CASES.case
def case_training_model_frozen(ctx):
    import numpy as np

    tf, keras, hub = ctx.imports()
    x = np.arange(32, dtype=np.float32).reshape(8, 4) / 10.0
    layer = hub.KerasLayer(ctx.model("training"))
    obj = layer.resolved_object
    infer, _ = _training_expectations(obj, x)
    assert _close(layer(x, training=True), infer)  # frozen: inference mode, like BatchNorm
    model = keras.Sequential([keras.Input(shape=(4,)), layer,
                              keras.layers.Dense(1, kernel_initializer="ones")])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    before = [v.numpy().copy() for v in obj.variables]
    model.fit(x, np.ones((8, 1), np.float32), epochs=1, batch_size=8, verbose=0)
    assert all(_close(v, b) for v, b in zip(obj.variables, before))
    assert model.losses == []
    assert (len(layer.trainable_weights), len(layer.non_trainable_weights)) == (0, 3)


@CASES.case
def case_signature_output_key(ctx):
    tf, keras, hub = ctx.imports()
    x = tf.constant(["hello world", "the fox"])
    layer = hub.KerasLayer(ctx.model("text"), signature="serving_default", output_key="embedding")
    out = layer({"sentences": x})
    expected = layer.resolved_object.signatures["serving_default"](sentences=x)
    assert _close(out, expected["embedding"]) and not _close(out, expected["default"])
    inputs = {"sentences": keras.Input(shape=(), dtype="string", name="sentences")}
    model = keras.Model(inputs, keras.layers.Dense(2)(layer(inputs)))
    assert tuple(model.layers[-2].output.shape) == (None, 8)
    assert model.predict({"sentences": x}, verbose=0).shape == (2, 2)


@CASES.case
def case_signature_outputs_as_dict(ctx):
    import numpy as np

    tf, keras, hub = ctx.imports()
    apples = np.array([[1.0, 2.0]], np.float32)
    oranges = np.array([[0.5, -1.0]], np.float32)
    layer = hub.KerasLayer(ctx.model("tf1"), signature="fruit_to_pet",
                           signature_outputs_as_dict=True)
    out = layer({"apples": tf.constant(apples), "oranges": tf.constant(oranges)})
    assert sorted(out) == ["cats", "dogs"]
    assert _close(out["cats"], apples @ np.array(W) + np.array(B))
    assert _close(out["dogs"], oranges @ np.array(W) - np.array(B))
    inputs = {k: keras.Input(shape=(2,), name=k) for k in ("apples", "oranges")}
    model = keras.Model(inputs, layer(inputs))
    pred = model.predict({"apples": apples, "oranges": oranges}, verbose=0)
    assert sorted(pred) == ["cats", "dogs"] and _close(pred["dogs"], out["dogs"])


@CASES.case
def case_tf1_hub_module_default_signature(ctx):
    import numpy as np

    tf, keras, hub = ctx.imports()
    x = np.array([[1.0, 1.0], [2.0, -1.0]], np.float32)
    layer = hub.KerasLayer(ctx.model("tf1"))
    assert _close(layer(tf.constant(x)), x @ np.array(W) + np.array(B))
    model = keras.Sequential([keras.Input(shape=(2,)), layer, keras.layers.Dense(1)])
    assert tuple(model.output_shape) == (None, 1)
    cfg = layer.get_config()
    assert (cfg["signature"], cfg["output_key"]) == ("default", "default")
    layer.trainable = True
    with pytest.raises(ValueError, match="TF1 Hub format"):
        layer(tf.constant(x))


@CASES.case
def case_arguments(ctx):
    tf, keras, hub = ctx.imports()
    layer = hub.KerasLayer(ctx.model("scaled"), arguments={"scale": 3.0})
    assert _close(layer(tf.constant([1.0, 2.0])), [6.0, 12.0])
    sig = hub.KerasLayer(ctx.model("scaled"), arguments={"scale": 0.5},
                         signature="serving_default", output_key="out")
    assert _close(sig({"x": tf.constant([1.0, 2.0])}), [1.0, 2.0])
    assert layer.get_config()["arguments"] == {"scale": 3.0}
    inp = keras.Input(shape=(3,))
    model = keras.Model(inp, layer(inp))
    assert _close(model.predict(tf.ones([1, 3]), verbose=0), [[6.0, 6.0, 6.0]])


@CASES.case
def case_invalid_combinations(ctx):
    """The invalid uses tensorflow_hub refuses raise the same exception types."""
    tf, keras, hub = ctx.imports()
    outcome = th.invalid_keras_layer_outcomes(hub, tf, ctx.model("text"), ctx.model("mul"))
    want = {k: "ValueError" for k in outcome}
    want["config of a callable"] = "NotImplementedError"
    assert outcome == want, outcome


@CASES.case
def case_config_round_trip(ctx):
    import json

    tf, keras, hub = ctx.imports()
    specs = [
        (dict(handle=ctx.model("mul"), output_shape=[2]), tf.constant([[1.0, 2.0]])),
        (dict(handle=ctx.model("training"), trainable=True, tags=["serve"]), tf.ones([2, 4])),
        (dict(handle=ctx.model("text"), signature="serving_default", output_key="embedding"),
         {"sentences": tf.constant(["hello world"])}),
        (dict(handle=ctx.model("tf1"), tags=[], signature="fruit_to_pet",
              signature_outputs_as_dict=True),
         {"apples": tf.ones([1, 2]), "oranges": tf.ones([1, 2])}),
        (dict(handle=ctx.model("scaled"), arguments={"scale": 2.0}), tf.constant([1.0])),
    ]
    # What tensorflow_hub 0.16.1 keeps (beyond the base layer's keys), and our tags.
    hub_keys = {"handle", "output_shape", "arguments", "signature", "output_key",
                "signature_outputs_as_dict"}
    for kwargs, x in specs:
        layer = hub.KerasLayer(**kwargs)
        config = layer.get_config()
        json.dumps(config)
        expected = {k for k in kwargs if k in hub_keys} | ({"tags"} if "tags" in kwargs else set())
        assert set(config) - {"name", "trainable", "dtype"} == expected, config
        assert config["trainable"] == kwargs.get("trainable", False)
        if "tags" in kwargs:
            assert config["tags"] == kwargs["tags"]
        clone = hub.KerasLayer.from_config(config)
        assert clone.get_config() == config
        assert clone.resolved_object is not layer.resolved_object
        a, b = layer(x), clone(x)
        tf.nest.assert_same_structure(a, b)
        assert all(_close(p, q) for p, q in zip(tf.nest.flatten(a), tf.nest.flatten(b)))
    # Registered for Keras serialization under the package "hubfast".
    assert keras.saving.get_registered_name(hub.keras.KerasLayer) == "hubfast>KerasLayer"
    assert keras.saving.get_registered_object("hubfast>KerasLayer") is hub.keras.KerasLayer


@CASES.case
def case_keras_file_round_trip_in_fresh_process(ctx):
    """Fine-tune, save .keras; a fresh process with an empty cache loads it, fetching the
    handle from the (loopback) TF Hub server through hubfast, and predicts the same."""
    import hashlib
    import os

    import numpy as np

    from hubfast.testing import models

    tf, keras, hub = ctx.imports()
    work = ctx.tmp("keras-file")
    archive = models.pack_tar(ctx.model("training"), str(work / "training.tar.gz"), "gz")
    try:
        from hubfast.server import TFHubServer
    except ImportError:  # the server is optional: a local archive takes the same path
        TFHubServer = None

    def run(handle, stats=None):
        layer = hub.KerasLayer(handle, trainable=True, tags=["serve"])
        obj = layer.resolved_object
        inp = keras.Input(shape=(4,))
        model = keras.Model(inp, keras.layers.Dense(1)(layer(inp)))
        model.compile(keras.optimizers.SGD(0.1), "mse")
        x = np.arange(16, dtype=np.float32).reshape(4, 4) / 8.0
        k0 = obj.kernel.numpy().copy()
        model.fit(x, np.ones((4, 1), np.float32), verbose=0)
        assert not _close(obj.kernel, k0)
        np.save(work / "x.npy", x)
        np.save(work / "y.npy", model.predict(x, verbose=0))
        np.save(work / "kernel.npy", obj.kernel.numpy())
        np.save(work / "kernel0.npy", k0)
        model.save(str(work / "m.keras"))
        cache = work / "fresh_cache"
        cache.mkdir()
        child = f"""
import os, sys, numpy as np, keras
import hubfast.keras_layer  # registers hubfast>KerasLayer (import hubfast alone stays TF-free)
w = {str(work)!r}
model = keras.models.load_model(os.path.join(w, "m.keras"))
layer = model.layers[1]
assert type(layer).__module__ == "hubfast.keras", type(layer)
assert layer.get_config()["tags"] == ["serve"]
x = np.load(os.path.join(w, "x.npy"))
np.testing.assert_allclose(model.predict(x, verbose=0), np.load(os.path.join(w, "y.npy")),
                           rtol=1e-5)
# the fine-tuned weights were restored into the SavedModel's own variables
kernel = layer.resolved_object.kernel.numpy()
np.testing.assert_allclose(kernel, np.load(os.path.join(w, "kernel.npy")), rtol=1e-6)
assert not np.allclose(kernel, np.load(os.path.join(w, "kernel0.npy")))
print("CHILD-OK")
"""
        env = th.worker_env(cache_dir=cache)
        before = stats() if stats else None
        proc = th.run_python(child, env, timeout=240)
        assert proc.returncode == 0 and "CHILD-OK" in proc.stdout, proc.stderr[-4000:]
        entry = hashlib.sha1(handle.encode("utf8")).hexdigest()
        if stats:
            assert stats() == before + 1, "the fresh process did not fetch from the server"
            assert (cache / entry).is_dir(), sorted(os.listdir(cache))
        else:
            assert os.listdir(cache), "the fresh process did not use its cache"

    if TFHubServer is None:
        run(archive)
        return {"handle": "local archive"}
    with TFHubServer() as server:
        server.add_archive("/hubfast/training/1", archive)
        url = server.url + "/hubfast/training/1"
        run(url, stats=lambda: server.stats.path("/hubfast/training/1").archive_gets)
    return {"handle": "server"}


@CASES.case
def case_output_shape_and_inference(ctx):
    import numpy as np

    tf, keras, hub = ctx.imports()
    given = hub.KerasLayer(ctx.model("mul"), output_shape=[3])
    assert tuple(given.compute_output_shape((None, 3))) == (None, 3)
    inferred = hub.KerasLayer(ctx.model("training"))
    assert tuple(inferred.compute_output_shape((None, 4))) == (None, 3)
    spec = inferred.compute_output_spec(keras.KerasTensor((None, 4)))
    assert tuple(spec.shape) == (None, 3) and spec.dtype == "float32"
    text = hub.KerasLayer(ctx.model("text"))
    assert tuple(text.compute_output_shape((None,))) == (None, 8)  # typed from the signature
    # keras.Sequential without an Input: built from the first batch, then Dense builds on top.
    model = keras.Sequential([hub.KerasLayer(ctx.model("mul")), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(np.ones((4, 3), np.float32), np.ones((4, 1), np.float32), verbose=0)
    assert model.predict(np.ones((2, 3), np.float32), verbose=0).shape == (2, 1)


@CASES.case
def case_tensorflow_hub_fails_under_keras3(ctx):
    """Documents the bug this layer fixes (tensorflow_hub #903): its KerasLayer is a tf_keras
    layer, which Keras 3 models refuse."""
    tf, keras, hub = ctx.imports()
    import tensorflow_hub

    layer = tensorflow_hub.KerasLayer(ctx.model("mul"))
    try:
        keras.Sequential([keras.Input(shape=(3,)), layer])
    except (ValueError, TypeError) as e:
        assert "keras.Layer" in str(e) or "KerasTensor" in str(e), e
    else:
        pytest.skip("tensorflow_hub's KerasLayer unexpectedly works in keras.Sequential")
    try:
        layer(keras.Input(shape=(3,)))
    except (ValueError, TypeError):
        pass
    else:
        pytest.skip("tensorflow_hub's KerasLayer unexpectedly works in the functional API")
    model = keras.Sequential([keras.Input(shape=(3,)), hub.KerasLayer(ctx.model("mul"))])
    assert _close(model(tf.ones([1, 3])), [[2.0, 2.0, 2.0]])


@CASES.case(fresh=True)
def case_tf_keras_and_keras3_models_in_one_process(ctx):
    """The default environment (tf.keras is Keras 3) serves tf_keras programs as tensorflow_hub
    does and Keras 3 programs too: one process trains and saves a tf_keras.Sequential and a
    keras.Sequential, each over a hubfast.KerasLayer, and loads both back."""
    import importlib.util

    import numpy as np

    tf, keras, hub = ctx.imports()
    from hubfast import keras_layer

    assert keras_layer.IS_KERAS_3
    # Before anything imported tf_keras, nothing could use a tf_keras layer: Keras 3.
    assert type(hub.KerasLayer(ctx.model("mul"))) is hub.keras.KerasLayer
    import tf_keras

    work = ctx.tmp("both")
    x = np.arange(16, dtype=np.float32).reshape(4, 4) / 8.0
    y = np.ones((4, 1), np.float32)

    def tf_keras_program():
        # Written for tensorflow_hub: names tf_keras, gets a tf_keras layer.
        layer = hub.KerasLayer(ctx.model("training"), trainable=True)
        model = tf_keras.Sequential([tf_keras.Input(shape=(4,)), layer,
                                     tf_keras.layers.Dense(1, kernel_initializer="ones")])
        model.compile(tf_keras.optimizers.SGD(0.1), "mse")
        return layer, model

    def keras3_program():
        layer = hub.KerasLayer(ctx.model("training"), trainable=True)
        model = keras.Sequential([keras.Input(shape=(4,)), layer,
                                  keras.layers.Dense(1, kernel_initializer="ones")])
        model.compile(keras.optimizers.SGD(0.1), "mse")
        return layer, model

    saved = {}
    for label, program, save_path in (("tf_keras", tf_keras_program, work / "tfk_model"),
                                      ("keras", keras3_program, work / "k3.keras")):
        layer, model = program()
        want = hub.tf_keras.KerasLayer if label == "tf_keras" else hub.keras.KerasLayer
        assert type(layer) is want, (label, type(layer))
        assert isinstance(layer, hub.KerasLayer)
        kernel0 = layer.resolved_object.kernel.numpy().copy()
        model.fit(x, y, epochs=2, verbose=0)
        # The optimizer trained the SavedModel's own variables.
        assert not _close(layer.resolved_object.kernel, kernel0), label
        saved[label] = (str(save_path), model.predict(x, verbose=0))
        model.save(str(save_path))

    tfk = tf_keras.models.load_model(saved["tf_keras"][0])
    assert type(tfk.layers[0]) is hub.tf_keras.KerasLayer, tfk.layers
    assert _close(tfk.predict(x, verbose=0), saved["tf_keras"][1], rtol=1e-4)
    k3 = keras.models.load_model(saved["keras"][0])
    assert type(k3.layers[0]) is hub.keras.KerasLayer, k3.layers
    assert _close(k3.predict(x, verbose=0), saved["keras"][1], rtol=1e-4)

    # What tf_keras programs see of the layer, as with tensorflow_hub: the SavedModel's
    # variables under their own names, shapes as TensorShape; from_config called by tf_keras'
    # deserialisation builds a tf_keras layer.
    def tf_keras_details():
        layer = hub.KerasLayer(ctx.model("training"), trainable=True)
        assert all(w.name.endswith(":0") for w in layer.weights), [w.name for w in layer.weights]
        assert layer.trainable_weights[0] is layer.resolved_object.kernel
        assert layer.compute_output_shape(tf.TensorShape([None, 4])) == tf.TensorShape([None, 3])
        config = tf_keras.Sequential([tf_keras.Input(shape=(4,)), layer]).to_json()
        clone = tf_keras.models.model_from_json(config, custom_objects={"KerasLayer": hub.KerasLayer})
        assert type(clone.layers[0]) is hub.tf_keras.KerasLayer

    tf_keras_details()

    # One module importing both Kerases: each function gets the Keras its code refers to;
    # code naming both gets tensorflow_hub's kind.
    program = ctx.tmp("program") / "program_using_both.py"
    program.write_text(
        "import keras\nimport tf_keras\nimport hubfast as hub\n\n"
        "def legacy(h):\n    return tf_keras.Sequential([hub.KerasLayer(h)])\n\n"
        "def new(h):\n    return keras.Sequential([hub.KerasLayer(h)])\n\n"
        "def both(h):\n    return hub.KerasLayer(h), keras.layers, tf_keras.layers\n")
    spec = importlib.util.spec_from_file_location("program_using_both", program)
    both_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(both_module)
    mul = ctx.model("mul")
    assert type(both_module.legacy(mul).layers[0]) is hub.tf_keras.KerasLayer
    assert type(both_module.new(mul).layers[0]) is hub.keras.KerasLayer
    assert type(both_module.both(mul)[0]) is hub.tf_keras.KerasLayer

    # Explicit flavours, whatever the code names.
    def names_tf_keras_wants_keras3():
        return tf_keras, hub.keras.KerasLayer(mul)

    assert type(names_tf_keras_wants_keras3()[1]) is hub.keras.KerasLayer
    assert type(hub.tf_keras.KerasLayer(mul)) is hub.tf_keras.KerasLayer
    assert issubclass(hub.keras.KerasLayer, hub.KerasLayer)
    assert issubclass(hub.tf_keras.KerasLayer, hub.KerasLayer)
    assert not isinstance(object(), hub.KerasLayer)


@CASES.case(fresh=True)
def case_mirrored_strategy(ctx):
    """Build under a MirroredStrategy over 2 logical CPUs, fit one step, predict."""
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf, keras, hub = ctx.imports()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    x = np.arange(32, dtype=np.float32).reshape(8, 4) / 10.0
    y = np.ones((8, 1), np.float32)
    path = ctx.model("training")
    with strategy.scope():
        layer = hub.KerasLayer(path, trainable=True)
        model = keras.Sequential([keras.Input(shape=(4,)), layer,
                                  keras.layers.Dense(1, kernel_initializer="ones")])
        model.compile(keras.optimizers.SGD(0.01), "mse")
    obj = layer.resolved_object
    assert isinstance(obj.kernel, tf.distribute.DistributedValues), type(obj.kernel)
    assert layer.trainable_weights[0].value is obj.kernel
    k0 = obj.kernel.numpy().copy()
    model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    assert not _close(obj.kernel, k0), "the SavedModel's variables did not train"
    copies = [_np(v) for v in obj.kernel.values]
    assert len(copies) == 2 and _close(copies[0], copies[1]), "replicas diverged"
    # The same step without a strategy, on a fresh copy of the model.
    plain = hub.load(path)
    want_k, _ = th.expected_sgd_step(plain, x, y, 0.01)
    assert _close(_np(obj.kernel) - k0, want_k - k0, rtol=1e-3), (obj.kernel.numpy(), want_k)
    # training=True reached each replica's call. The SavedModel's moving mean is a plain
    # tf.Variable (aggregation NONE): each replica updates its own copy from its half of
    # the batch, as it would with tensorflow_hub and tf_keras.
    halves = (x[:4], x[4:])
    mms = [_np(v) for v in obj.moving_mean.values]
    for mm, half in zip(mms, halves):
        assert _close(mm, 0.1 * np.mean(half @ k0 + plain.bias.numpy(), axis=0), rtol=1e-4)
    pred = model.predict(x, batch_size=8, verbose=0)
    dense = model.layers[-1]
    want = np.concatenate([(half @ obj.kernel.numpy() + obj.bias.numpy() - mm)
                           @ dense.kernel.numpy() + dense.bias.numpy()
                           for mm, half in zip(mms, halves)])
    assert _close(pred, want, rtol=1e-4), (pred, want)


def _rss_measure(ctx, train):
    """Write the big model, warm up the Keras/TF machinery on a tiny one, load the big one,
    call `train(obj)`; RSS growth in bytes over the RSS right after hubfast.load.

    Run with MALLOC_MMAP_THRESHOLD_ small: large blocks then come straight from mmap and go
    back on free, so that writing the model first leaves no reusable heap behind and RSS
    shows live memory."""
    import gc

    import numpy as np

    from hubfast.testing import models

    tf, keras, hub = ctx.imports()
    big = models.write_gaussian_model(str(ctx.tmp("big")), BIG_MODEL_BYTES, chunk_mib=16)
    warm = hub.load(ctx.model("mul"))
    train(warm, k=1)
    gc.collect()
    obj = hub.load(big)
    gc.collect()
    after_load = th.rss_bytes()
    w0 = obj.w[0][0].numpy().copy()
    info = train(obj, k=16) or {}
    gc.collect()
    info["growth"] = th.rss_bytes() - after_load
    info["trained"] = not np.allclose(w0, obj.w[0][0].numpy())
    return info


@CASES.case(fresh=True)
def case_rss_keras_layer(ctx):
    import gc

    import numpy as np

    tf, keras, hub = ctx.imports()

    def train(obj, k):
        gc.collect()
        before = th.rss_bytes()
        layer = hub.KerasLayer(obj, trainable=True)
        model = keras.Sequential([keras.Input(shape=(k,)), layer, keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.01), "mse")
        gc.collect()
        constructed = th.rss_bytes() - before
        model.fit(np.ones((4, k), np.float32), np.ones((4, 1), np.float32), batch_size=4,
                  verbose=0)
        same = all(w.value is v for w, v in zip(layer.trainable_weights, obj.trainable_variables))
        return {"construct": constructed, "same_variables": same}

    return _rss_measure(ctx, train)


@CASES.case(fresh=True)
def case_rss_bare_tensorflow(ctx):
    """The floor: the same training step by hand with a GradientTape, no KerasLayer."""
    import numpy as np

    tf, keras, hub = ctx.imports()

    def train(obj, k):
        dense = keras.layers.Dense(1)
        x, y = np.ones((4, k), np.float32), np.ones((4, 1), np.float32)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(dense(obj(x)) - y))
            variables = list(obj.trainable_variables) + list(dense.trainable_weights)
            for v, g in zip(variables, tape.gradient(loss, variables)):
                v.assign_sub(0.01 * g)

        step()

    return _rss_measure(ctx, train)


# ---------------------------------------------------------------------------
# pytest side
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras3_session(request, tmp_path_factory):
    run = CASES.session(request, tmp_path_factory.mktemp("keras3_cases"))
    yield run
    run.wait()


@pytest.mark.parametrize("name", CASES.shared_names())
def test_case(keras3_session, name):
    keras3_session.check(name)


def test_import_hubfast_does_not_import_tensorflow():
    code = ("import sys, hubfast\n"
            "assert 'KerasLayer' in hubfast.__all__\n"
            "assert 'tensorflow' not in sys.modules, 'import hubfast imported TensorFlow'\n"
            "assert 'hubfast.keras_layer' not in sys.modules\n")
    proc = th.run_python(code, th.worker_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_tf_keras_and_keras3_models_in_one_process(tmp_path):
    CASES.run_fresh("tf_keras_and_keras3_models_in_one_process", tmp_path)


def test_mirrored_strategy(tmp_path):
    CASES.run_fresh("mirrored_strategy", tmp_path)


def test_one_copy_of_the_weights_in_memory(tmp_path):
    """Constructing a trainable layer over a 64 MiB model and running one fit step costs about
    what the same step costs with bare TensorFlow: no second copy of the weights."""
    env = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    runs = {name: CASES.start_fresh(name, tmp_path / name, env)
            for name in ("rss_keras_layer", "rss_bare_tensorflow")}
    ours = runs["rss_keras_layer"].check("rss_keras_layer")
    floor = runs["rss_bare_tensorflow"].check("rss_bare_tensorflow")
    mib = 1 << 20
    report = (f"KerasLayer: construct +{ours['construct'] / mib:.1f} MiB, after the step "
              f"+{ours['growth'] / mib:.1f} MiB; bare TensorFlow step +{floor['growth'] / mib:.1f} "
              f"MiB; model {BIG_MODEL_BYTES / mib:.0f} MiB")
    print(report, file=sys.stderr)
    assert ours["same_variables"] and ours["trained"] and floor["trained"], report
    assert ours["construct"] < BIG_MODEL_BYTES / 8, report
    assert ours["growth"] < 2 * BIG_MODEL_BYTES, report
    assert ours["growth"] < floor["growth"] + BIG_MODEL_BYTES / 2, report
