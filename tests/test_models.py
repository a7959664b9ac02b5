"""Tests for hubfast.testing.models: real SavedModels and tfhub.dev-like archives."""

from __future__ import annotations

import glob
import gzip
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

tf = pytest.importorskip("tensorflow")

pytestmark = pytest.mark.tf

_MODELS_PY = Path(__file__).resolve().parents[1] / "python" / "hubfast" / "testing" / "models.py"


def _import_models():
    """Imports hubfast.testing.models, or the file alone if the package cannot be imported
    (e.g. hubfast/__init__.py needs a native module that is not built)."""
    try:
        from hubfast.testing import models  # noqa: PLC0415

        return models
    except Exception:  # pragma: no cover - depends on the state of the package
        spec = importlib.util.spec_from_file_location("hubfast_testing_models", _MODELS_PY)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


models = _import_models()

np = pytest.importorskip("numpy")


def _hub():
    """tensorflow_hub, or skip (0.16.1 imports pkg_resources, gone with setuptools >= 82)."""
    try:
        import tensorflow_hub as hub  # noqa: PLC0415
    except Exception as e:  # ImportError, or pkg_resources missing
        pytest.skip(f"tensorflow_hub not importable: {e!r}")
    return hub


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every model, built once for the module."""
    root = tmp_path_factory.mktemp("models")
    return {
        "mul": models.write_mul_model(root / "mul"),
        "text": models.write_text_embedding_model(root / "text"),
        "train": models.write_training_model(root / "train"),
        "tf1": models.write_tf1_hub_module(root / "tf1"),
        "gauss": models.write_gaussian_model(root / "gauss", 1 << 20, chunk_mib=1),
    }


# --------------------------------------------------------------------------- import hygiene


def test_module_imports_without_tensorflow():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(_MODELS_PY)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported eagerly'\n"
        "assert 'zstandard' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------- models


def test_mul_model(built):
    obj = tf.saved_model.load(built["mul"])
    np.testing.assert_allclose(obj(tf.constant([10.0, 20.0])).numpy(), [20.0, 40.0])
    np.testing.assert_allclose(obj.regularization_losses[0]().numpy(), 0.004, rtol=1e-6)
    assert [v.numpy() for v in obj.trainable_variables] == [2.0]
    assert len(obj.variables) == 1
    # Shape=None signature: scalars and matrices too.
    assert obj(tf.constant(3.0)).numpy() == 6.0


def test_mul_model_v_init(tmp_path):
    obj = tf.saved_model.load(models.write_mul_model(tmp_path / "m", v_init=3.0))
    np.testing.assert_allclose(obj(tf.constant([1.0, 2.0])).numpy(), [3.0, 6.0])


def test_text_embedding_model(built):
    path = built["text"]
    with open(os.path.join(path, "assets", "vocab.txt"), encoding="utf-8") as f:
        assert f.read().split() == list(models.DEFAULT_VOCAB)
    obj = tf.saved_model.load(path)
    emb = obj.embeddings.numpy()
    assert emb.shape == (len(models.DEFAULT_VOCAB) + 1, 8)
    vocab = {t: i for i, t in enumerate(models.DEFAULT_VOCAB)}
    oov = len(models.DEFAULT_VOCAB)
    out = obj(tf.constant(["hello world", "the  quick zzz", ""])).numpy()
    assert out.shape == (3, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], (emb[vocab["hello"]] + emb[vocab["world"]]) / 2, rtol=1e-5)
    np.testing.assert_allclose(
        out[1], (emb[vocab["the"]] + emb[vocab["quick"]] + emb[oov]) / 3, rtol=1e-5
    )
    np.testing.assert_array_equal(out[2], np.zeros(8, np.float32))
    sig = obj.signatures["serving_default"](sentences=tf.constant(["hello world"]))
    assert set(sig) == {"default", "embedding"}
    np.testing.assert_allclose(sig["default"].numpy(), out[:1], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(sig["embedding"].numpy(), axis=-1), [1.0], rtol=1e-5)
    assert len(obj.variables) == 1 and len(obj.trainable_variables) == 1
    assert list(obj.regularization_losses) == []


def test_text_embedding_asset_is_used_after_move(built, tmp_path):
    # The loaded model reads its vocabulary from its own assets/ (not the build-time temp file).
    moved = shutil.copytree(built["text"], tmp_path / "moved")
    obj = tf.saved_model.load(str(moved))
    a = obj(tf.constant(["fox dog"])).numpy()
    b = tf.saved_model.load(built["text"])(tf.constant(["fox dog"])).numpy()
    np.testing.assert_array_equal(a, b)


def test_training_model(built):
    obj = tf.saved_model.load(built["train"])
    x = tf.constant([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]])
    kernel, bias = (v.numpy() for v in obj.trainable_variables)
    y = x.numpy() @ kernel + bias
    np.testing.assert_allclose(obj(x, training=False).numpy(), y, rtol=1e-5)
    np.testing.assert_allclose(obj(x).numpy(), y, rtol=1e-5)
    np.testing.assert_allclose(
        obj.signatures["serving_default"](x=x)["default"].numpy(), y, rtol=1e-5
    )
    assert not obj.moving_mean.numpy().any()
    np.testing.assert_allclose(obj(x, training=True).numpy(), 0.5 * y, rtol=1e-5)
    np.testing.assert_allclose(obj.moving_mean.numpy(), 0.1 * y.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(
        obj(x, training=False).numpy(), y - 0.1 * y.mean(axis=0), rtol=1e-5, atol=1e-6
    )
    assert len(obj.variables) == 3 and len(obj.trainable_variables) == 2
    np.testing.assert_allclose(
        obj.regularization_losses[0]().numpy(), 0.01 * (kernel**2).sum(), rtol=1e-5
    )


def test_tf1_hub_module(built):
    path = built["tf1"]
    with open(os.path.join(path, "tfhub_module.pb"), "rb") as f:
        assert f.read() == b"\x08\x03"
    obj = tf.saved_model.load(path, tags=[])
    out = obj.signatures["default"](x=tf.constant([[1.0, 1.0]]))
    np.testing.assert_allclose(out["default"].numpy(), [[5.5, 6.5, 10.0]])
    pets = obj.signatures["fruit_to_pet"](
        apples=tf.constant([[1.0, 0.0]]), oranges=tf.constant([[0.0, 1.0]])
    )
    np.testing.assert_allclose(pets["cats"].numpy(), [[1.5, 1.5, 4.0]])
    np.testing.assert_allclose(pets["dogs"].numpy(), [[3.5, 5.5, 5.0]])


def test_tf1_hub_module_with_tensorflow_hub(built):
    hub = _hub()
    obj = hub.load(built["tf1"])
    out = obj.signatures["default"](x=tf.constant([[1.0, 1.0]]))
    np.testing.assert_allclose(out["default"].numpy(), [[5.5, 6.5, 10.0]])


def test_gaussian_model(built, tmp_path):
    path = built["gauss"]
    data = os.path.join(path, "variables", "variables.data-00000-of-00001")
    assert abs(os.path.getsize(data) - (1 << 20)) < 64 << 10
    obj = tf.saved_model.load(path)
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    ws = [w.numpy() for w in obj.variables]
    assert sum(w.size for w in ws) * 4 == 1 << 20
    assert len(ws) == 1  # chunk_mib=1
    expected = x @ ws[0][:16] + sum(w[0] for w in ws)
    np.testing.assert_allclose(obj(tf.constant(x)).numpy(), expected, rtol=1e-4, atol=1e-4)
    sig = obj.signatures["serving_default"](x=tf.constant(x))["default"].numpy()
    np.testing.assert_allclose(sig, expected, rtol=1e-4, atol=1e-4)
    w = ws[0].ravel()
    assert abs(w.mean()) < 0.01 and abs(w.std() - 1.0) < 0.01
    # Gaussian float32 compresses like real weights (~0.92 with gzip -6).
    raw = w.tobytes()
    assert 0.88 < len(gzip.compress(raw, 6)) / len(raw) < 0.96


def test_gaussian_model_chunks_and_seed(tmp_path):
    a = models.write_gaussian_model(tmp_path / "a", 3 << 20, chunk_mib=1, seed=7)
    obj = tf.saved_model.load(a)
    assert [tuple(v.shape) for v in obj.variables] == [(16384, 16)] * 3
    b = models.write_gaussian_model(tmp_path / "b", 3 << 20, chunk_mib=1, seed=7)
    assert models.tree_digest(os.path.join(a, "variables")) == models.tree_digest(
        os.path.join(b, "variables")
    )


def test_keras_layer_parity(built):
    """tensorflow_hub's KerasLayer drives the models as the seed pages describe."""
    hub = _hub()
    layer = hub.KerasLayer(built["mul"])
    np.testing.assert_allclose(layer(tf.constant([10.0, 20.0])).numpy(), [20.0, 40.0])
    layer.trainable = True
    assert [w.numpy() for w in layer.trainable_weights] == [2.0]
    np.testing.assert_allclose([l.numpy() for l in layer.losses], [0.004], rtol=1e-6)

    x = tf.ones([2, 4])
    t = hub.KerasLayer(built["train"], trainable=True)
    inference = t(x, training=False).numpy()  # before the moving mean moves
    np.testing.assert_allclose(t(x, training=True).numpy(), 0.5 * inference, rtol=1e-5)
    assert t.non_trainable_weights and t.non_trainable_weights[0].numpy().any()
    s = hub.KerasLayer(built["text"], signature="serving_default", output_key="embedding")
    np.testing.assert_allclose(
        np.linalg.norm(s(tf.constant(["hello world"])).numpy(), axis=-1), [1.0], rtol=1e-5
    )


# --------------------------------------------------------------------------- packing


def _extract(archive: str, compression: str, dest: Path) -> list:
    """Extracts with Python's tarfile (zstd decoded with zstandard across all frames)."""
    dest.mkdir()
    if compression == "zst":
        zstandard = pytest.importorskip("zstandard")
        with open(archive, "rb") as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            data = reader.read()
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    else:
        tar = tarfile.open(archive, mode="r:*")
    with tar:
        names = tar.getnames()
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover
            tar.extractall(dest)
    return names


@pytest.mark.parametrize("compression", ["gz", "zst", "bz2", "xz", "none"])
def test_pack_tar_roundtrip(built, tmp_path, compression):
    if compression == "zst":
        pytest.importorskip("zstandard")
    src = built["text"]
    out = models.pack_tar(src, tmp_path / f"m.tar.{compression}", compression=compression)
    assert out == str(tmp_path / f"m.tar.{compression}")
    names = _extract(out, compression, tmp_path / "x")
    assert names[0] == "."  # "./" in the header; tarfile strips the slash
    assert "./saved_model.pb" in names
    assert "./variables/variables.index" in names
    assert "./variables/variables.data-00000-of-00001" in names
    assert "./assets/vocab.txt" in names
    assert names[1:] == sorted(names[1:])
    assert models.tree_digest(tmp_path / "x") == models.tree_digest(src)
    assert models.tree_digest(tmp_path / "x", include_dirs=True) == models.tree_digest(
        src, include_dirs=True
    )
    assert not glob.glob(out + ".*partial")


def test_pack_tar_gz_is_one_gzip_member_like_gzip_6(built, tmp_path):
    src = built["train"]
    out = models.pack_tar(src, tmp_path / "a.tar.gz", mtime=0)
    raw = Path(out).read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    tar_bytes = gzip.decompress(raw)
    plain = models.pack_tar(src, tmp_path / "a.tar", compression="none", mtime=0)
    assert tar_bytes == Path(plain).read_bytes()
    if shutil.which("gzip"):
        expect = subprocess.run(["gzip", "-6", "-n", "-c"], input=tar_bytes, capture_output=True,
                                check=True).stdout
        assert raw == expect
    # Python's gzip fallback: another deflate stream, same content.
    py = models.pack_tar(src, tmp_path / "p.tar.gz", mtime=0, gzip_tool=None)
    assert gzip.decompress(Path(py).read_bytes()) == tar_bytes
    # A single gzip member: the first member's end is the end of the file.
    d = zlib.decompressobj(31)
    d.decompress(raw)
    assert d.eof and d.unused_data == b""


def test_pack_tar_reproducible_with_mtime(built, tmp_path):
    src = built["mul"]
    for comp in ("gz", "none", "xz"):
        a = Path(models.pack_tar(src, tmp_path / f"a.{comp}", compression=comp, mtime=1)).read_bytes()
        b = Path(models.pack_tar(src, tmp_path / f"b.{comp}", compression=comp, mtime=1)).read_bytes()
        assert a == b


def test_pack_tar_member_prefix(built, tmp_path):
    src = built["mul"]
    bare = models.pack_tar(src, tmp_path / "bare.tar", compression="none", member_prefix="")
    with tarfile.open(bare) as t:
        names = t.getnames()
    assert "saved_model.pb" in names and "." not in names and "./saved_model.pb" not in names
    sub = models.pack_tar(src, tmp_path / "sub.tar", compression="none", member_prefix="model/")
    with tarfile.open(sub) as t:
        names = t.getnames()
    assert names[0] == "model" and "model/variables/variables.index" in names


def test_pack_tar_multi_frame_zstd(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    src = models.write_gaussian_model(tmp_path / "g", 1 << 20, chunk_mib=1)
    frame = 256 << 10
    out = models.pack_tar(src, tmp_path / "g.tar.zst", compression="zst", zstd_frame_size=frame)
    n = models.zstd_frame_count(out)
    tar_size = os.path.getsize(models.pack_tar(src, tmp_path / "g.tar", compression="none"))
    assert n == -(-tar_size // frame) and n > 1
    # Every frame is independent, records its content size and has a checksum.
    data = Path(out).read_bytes()
    off, sizes = 0, []
    dctx = zstandard.ZstdDecompressor()
    while off < len(data):
        params = zstandard.get_frame_parameters(data[off:off + 18])
        assert params.has_checksum
        sizes.append(params.content_size)
        dobj = dctx.decompressobj()
        dobj.decompress(data[off:])
        off = len(data) - len(dobj.unused_data)
    assert sizes[:-1] == [frame] * (n - 1) and sum(sizes) == tar_size
    names = _extract(out, "zst", tmp_path / "x")
    assert "./variables/variables.data-00000-of-00001" in names
    assert models.tree_digest(tmp_path / "x") == models.tree_digest(src)
    single = models.pack_tar(src, tmp_path / "one.tar.zst", compression="zst")
    assert models.zstd_frame_count(single) == 1


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar tool")
def test_pack_tar_extracts_with_gnu_tar(built, tmp_path):
    src = built["text"]
    out = models.pack_tar(src, tmp_path / "m.tar.gz")
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-xzf", out, "-C", str(dest)], check=True)
    assert models.tree_digest(dest) == models.tree_digest(src)
    if shutil.which("zstd"):
        z = models.pack_tar(src, tmp_path / "m.tar.zst", compression="zst", zstd_frame_size=4096)
        dest2 = tmp_path / "y"
        dest2.mkdir()
        subprocess.run(f"zstd -dc {z} | tar -xf - -C {dest2}", shell=True, check=True)
        assert models.tree_digest(dest2) == models.tree_digest(src)


def test_tree_digest_detects_changes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"hello")
    d1 = models.tree_digest(tmp_path / "a")
    assert d1 == {"f": (5, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")}
    (tmp_path / "a" / "f").write_bytes(b"hellO")
    assert models.tree_digest(tmp_path / "a") != d1
    (tmp_path / "a" / "empty").mkdir()
    assert "empty/" in models.tree_digest(tmp_path / "a", include_dirs=True)


def test_refuses_non_empty_dir(tmp_path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(FileExistsError):
        models.write_mul_model(tmp_path)
