"""Real SavedModels and tfhub.dev-like archives for tests, the demo and benchmarks.

Every ``write_*`` function writes a real model with real TensorFlow and returns
its directory. TensorFlow is imported inside the functions only, so that
``import hubfast.testing`` works without it; the packing helpers
(:func:`pack_tar`, :func:`tree_digest`) need no TensorFlow at all (``zstandard``
only for ``compression="zst"``).

Models:

* :func:`write_mul_model`: the ``MyMulModel`` of the "Exporting a SavedModel"
  page, line for line (Reusable SavedModel interface).
* :func:`write_text_embedding_model`: string sentences -> mean token embedding,
  with a vocabulary file under ``assets/`` and a two-output ``serving_default``.
* :func:`write_training_model`: dense layer with a batch-norm-like moving mean
  and dropout-like scaling, ``__call__`` traced for ``training=True`` and
  ``training=False``, regularization losses.
* :func:`write_tf1_hub_module`: a legacy TF1 Hub format module (empty tag set,
  ``default`` and ``fruit_to_pet`` signatures, ``tfhub_module.pb``).
* :func:`write_gaussian_model`: ``size_bytes`` of N(0, 1) float32 weights in
  bounded-size variables, cheap first call; for 1 MiB up to a few GiB.

Packing: :func:`pack_tar` writes archives whose members look like tfhub.dev's
(``./``, ``./saved_model.pb``, ``./variables/variables.index``, ...), streamed
into gzip (the ``gzip -6`` tool by default, like ``tar | gzip -6``), zstd
(optionally many independent frames, decodable in parallel), bzip2, xz or none.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "DEFAULT_VOCAB",
    "TF1_MODULE_DEF_BYTES",
    "write_mul_model",
    "write_text_embedding_model",
    "write_training_model",
    "write_tf1_hub_module",
    "write_gaussian_model",
    "pack_tar",
    "tree_digest",
    "zstd_frame_count",
]

#: Vocabulary of :func:`write_text_embedding_model` unless one is given.
DEFAULT_VOCAB: Tuple[str, ...] = (
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
    "hello", "world", "cat", "hub", "model", "fast",
)

#: Serialized ``tensorflow_hub`` ``ModuleDef`` proto with ``format = FORMAT_V3``
#: (field 1, varint 3): the content of ``tfhub_module.pb`` in TF1 Hub modules.
TF1_MODULE_DEF_BYTES = b"\x08\x03"

_MIB = 1 << 20


def _tf() -> Any:
    """Imports TensorFlow lazily (keeps ``import hubfast.testing`` TF-free)."""
    import tensorflow as tf  # noqa: PLC0415

    return tf


def _fresh_dir(path: PathLike) -> str:
    """Returns ``path`` as a str; refuses a non-empty existing directory."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"refusing to write a model into non-empty directory {path!r}")
    return path


# ---------------------------------------------------------------------------
# 1. MyMulModel
# ---------------------------------------------------------------------------


def write_mul_model(path: PathLike, v_init: float = 2.0) -> str:
    """Writes the ``MyMulModel`` of the TF Hub "Exporting a SavedModel" page.

    ``obj(x) == x * v`` for a float32 tensor of any shape; ``v`` (initially
    ``v_init``) is the one (trainable) variable; ``regularization_losses[0]()``
    is ``0.001 * v**2`` (0.004 for the default ``v_init=2.0``).

    Returns:
      ``path`` as a string.
    """
    tf = _tf()
    path = _fresh_dir(path)

    class MyMulModel(tf.train.Checkpoint):
        def __init__(self, v_init):
            super().__init__()
            self.v = tf.Variable(v_init)
            self.variables = [self.v]
            self.trainable_variables = [self.v]
            self.regularization_losses = [
                tf.function(input_signature=[])(lambda: 0.001 * self.v**2),
            ]

        @tf.function(input_signature=[tf.TensorSpec(shape=None, dtype=tf.float32)])
        def __call__(self, inputs):
            return tf.multiply(inputs, self.v)

    tf.saved_model.save(MyMulModel(float(v_init)), path)
    return path


# ---------------------------------------------------------------------------
# 2. Text embedding
# ---------------------------------------------------------------------------


def write_text_embedding_model(
    path: PathLike,
    vocab: Sequence[str] = DEFAULT_VOCAB,
    dim: int = 8,
    seed: int = 0,
) -> str:
    """Writes a text-embedding-like Reusable SavedModel.

    Interface of the loaded object ``obj``:

    * ``obj(sentences)``: ``sentences`` is a 1-D ``tf.string`` tensor; each is
      split on whitespace, tokens are looked up in the vocabulary (a file under
      ``assets/vocab.txt``, one token per line; unknown tokens map to the
      out-of-vocabulary id ``len(vocab)``) and the rows of the embedding matrix
      are averaged. Output: ``[batch, dim]`` float32; an empty sentence gives
      zeros.
    * ``obj.embeddings``: trainable ``[len(vocab) + 1, dim]`` float32 variable,
      N(0, 1) from ``seed`` (the last row is the OOV row).
    * ``obj.variables``, ``obj.trainable_variables`` (both ``[embeddings]``),
      ``obj.regularization_losses`` (empty).
    * ``obj.signatures["serving_default"](sentences=...)`` returns
      ``{"default": <same as obj(sentences)>, "embedding": <the same rows
      L2-normalised>}``: two different outputs, so ``output_key`` matters.

    Returns:
      ``path`` as a string.
    """
    import numpy as np  # noqa: PLC0415

    tf = _tf()
    path = _fresh_dir(path)
    vocab = [str(t) for t in vocab]
    if not vocab:
        raise ValueError("vocab must not be empty")
    for tok in vocab:
        if not tok or any(c.isspace() for c in tok):
            raise ValueError(f"vocabulary tokens must be non-empty and contain no whitespace: {tok!r}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocabulary tokens must be unique")
    oov_id = len(vocab)
    init = np.random.default_rng(seed).standard_normal((oov_id + 1, dim)).astype(np.float32)

    with tempfile.TemporaryDirectory(prefix="hubfast-vocab-") as tmp:
        vocab_path = os.path.join(tmp, "vocab.txt")
        with open(vocab_path, "w", encoding="utf-8") as f:
            f.write("".join(tok + "\n" for tok in vocab))

        class TextEmbedding(tf.train.Checkpoint):
            def __init__(self):
                super().__init__()
                self.vocab_file = tf.saved_model.Asset(vocab_path)
                initializer = tf.lookup.TextFileInitializer(
                    self.vocab_file,
                    key_dtype=tf.string,
                    key_index=tf.lookup.TextFileIndex.WHOLE_LINE,
                    value_dtype=tf.int64,
                    value_index=tf.lookup.TextFileIndex.LINE_NUMBER,
                )
                self.table = tf.lookup.StaticHashTable(initializer, default_value=oov_id)
                self.embeddings = tf.Variable(init, trainable=True, name="embeddings")
                self.variables = [self.embeddings]
                self.trainable_variables = [self.embeddings]
                self.regularization_losses = []

            def _embed(self, sentences):
                tokens = tf.strings.split(sentences)  # RaggedTensor [batch, (tokens)]
                ids = tf.ragged.map_flat_values(self.table.lookup, tokens)
                rows = tf.ragged.map_flat_values(tf.gather, self.embeddings, ids)
                total = tf.reduce_sum(rows, axis=1)  # [batch, dim]
                count = tf.cast(tf.expand_dims(ids.row_lengths(), -1), tf.float32)
                return total / tf.maximum(count, 1.0)

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
            def __call__(self, sentences):
                return self._embed(sentences)

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="sentences")])
            def serve(self, sentences):
                mean = self._embed(sentences)
                return {"default": mean, "embedding": tf.math.l2_normalize(mean, axis=-1)}

        module = TextEmbedding()
        tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path


# ---------------------------------------------------------------------------
# 3. Training-aware model
# ---------------------------------------------------------------------------


def write_training_model(path: PathLike, units: int = 3, in_dim: int = 4, seed: int = 0) -> str:
    """Writes a Reusable SavedModel whose output depends on ``training``.

    With ``y = x @ kernel + bias`` (``x``: ``[batch, in_dim]`` float32):

    * ``obj(x, training=False)`` (also ``obj(x)``) returns ``y - moving_mean``
      and changes nothing;
    * ``obj(x, training=True)`` returns ``0.5 * y`` (a deterministic stand-in
      for dropout) and updates the batch-norm-like non-trainable variable
      ``moving_mean <- 0.9 * moving_mean + 0.1 * mean(y, axis=0)``.

    On a fresh model (``moving_mean == 0``) the two differ by a factor of 2.
    ``training`` is a Python bool: ``__call__`` is traced once for each value,
    as Keras does, and tensorflow_hub's KerasLayer passes it by keyword.

    Attributes: ``kernel`` ``[in_dim, units]`` and ``bias`` ``[units]``
    (trainable, N(0, 1) from ``seed``), ``moving_mean`` ``[units]`` (zeros,
    non-trainable), ``variables`` (all three), ``trainable_variables``
    (kernel, bias), ``regularization_losses`` = ``[0.01 * sum(kernel**2)]`` as a
    ``tf.function`` without arguments. ``signatures["serving_default"](x=...)``
    returns ``{"default": obj(x, training=False)}``.

    Returns:
      ``path`` as a string.
    """
    import numpy as np  # noqa: PLC0415

    tf = _tf()
    path = _fresh_dir(path)
    rng = np.random.default_rng(seed)
    kernel0 = rng.standard_normal((in_dim, units)).astype(np.float32)
    bias0 = rng.standard_normal((units,)).astype(np.float32)

    class TrainingModel(tf.train.Checkpoint):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(kernel0, trainable=True, name="kernel")
            self.bias = tf.Variable(bias0, trainable=True, name="bias")
            self.moving_mean = tf.Variable(
                tf.zeros([units], tf.float32), trainable=False, name="moving_mean"
            )
            self.variables = [self.kernel, self.bias, self.moving_mean]
            self.trainable_variables = [self.kernel, self.bias]
            self.regularization_losses = [
                tf.function(input_signature=[])(
                    lambda: 0.01 * tf.reduce_sum(tf.square(self.kernel))
                ),
            ]

        @tf.function
        def __call__(self, x, training=False):
            y = tf.matmul(x, self.kernel) + self.bias
            if training:  # a Python bool: one trace per value
                self.moving_mean.assign(
                    0.9 * self.moving_mean + 0.1 * tf.reduce_mean(y, axis=0)
                )
                return 0.5 * y
            return y - self.moving_mean

        @tf.function(input_signature=[tf.TensorSpec([None, in_dim], tf.float32, name="x")])
        def serve(self, x):
            return {"default": self.__call__(x, training=False)}

    model = TrainingModel()
    spec = tf.TensorSpec([None, in_dim], tf.float32)
    model.__call__.get_concrete_function(spec, training=True)
    model.__call__.get_concrete_function(spec, training=False)
    model.__call__.get_concrete_function(spec)  # obj(x): the default, training=False
    tf.saved_model.save(model, path, signatures={"serving_default": model.serve})
    return path


# ---------------------------------------------------------------------------
# 4. TF1 Hub format module
# ---------------------------------------------------------------------------


def write_tf1_hub_module(path: PathLike) -> str:
    """Writes a legacy TF1 Hub format module.

    A ``tf.compat.v1`` graph saved with ``tf.compat.v1.saved_model.Builder``
    under the EMPTY tag set, plus ``tfhub_module.pb`` (a ``ModuleDef`` with
    ``format = FORMAT_V3``) at the top level. Load it with
    ``tf.saved_model.load(path, tags=[])`` or ``hub.load(path)``. Signatures
    (inputs and outputs by name, all float32):

    * ``default``: ``x`` ``[None, 2]`` -> ``default`` ``[None, 3]`` =
      ``x @ W + b`` with ``W = [[1, 2, 3], [4, 5, 6]]``, ``b = [0.5, -0.5, 1]``;
    * ``fruit_to_pet``: ``apples``, ``oranges`` ``[None, 2]`` ->
      ``cats = apples @ W + b`` and ``dogs = oranges @ W - b``.

    Returns:
      ``path`` as a string.
    """
    tf = _tf()
    path = _fresh_dir(path)
    if os.path.isdir(path):
        os.rmdir(path)  # the Builder insists on creating the directory itself
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        w = v1.get_variable(
            "dense/kernel", shape=[2, 3], dtype=tf.float32,
            initializer=v1.constant_initializer([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
        )
        b = v1.get_variable(
            "dense/bias", shape=[3], dtype=tf.float32,
            initializer=v1.constant_initializer([0.5, -0.5, 1.0]),
        )
        x = v1.placeholder(tf.float32, shape=[None, 2], name="x")
        default = tf.identity(tf.matmul(x, w) + b, name="default")
        apples = v1.placeholder(tf.float32, shape=[None, 2], name="apples")
        oranges = v1.placeholder(tf.float32, shape=[None, 2], name="oranges")
        cats = tf.identity(tf.matmul(apples, w) + b, name="cats")
        dogs = tf.identity(tf.matmul(oranges, w) - b, name="dogs")
        build = v1.saved_model.utils.build_tensor_info
        sigs = {
            "default": v1.saved_model.signature_def_utils.build_signature_def(
                inputs={"x": build(x)}, outputs={"default": build(default)},
                method_name=v1.saved_model.signature_constants.PREDICT_METHOD_NAME,
            ),
            "fruit_to_pet": v1.saved_model.signature_def_utils.build_signature_def(
                inputs={"apples": build(apples), "oranges": build(oranges)},
                outputs={"cats": build(cats), "dogs": build(dogs)},
                method_name=v1.saved_model.signature_constants.PREDICT_METHOD_NAME,
            ),
        }
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(path)
            builder.add_meta_graph_and_variables(sess, tags=[], signature_def_map=sigs)
            builder.save()
    with open(os.path.join(path, "tfhub_module.pb"), "wb") as f:
        f.write(TF1_MODULE_DEF_BYTES)
    return path


# ---------------------------------------------------------------------------
# 5. Gaussian weights of a given size
# ---------------------------------------------------------------------------


def write_gaussian_model(
    path: PathLike,
    size_bytes: int,
    seed: int = 0,
    chunk_mib: int = 64,
    k: int = 16,
) -> str:
    """Writes a SavedModel holding about ``size_bytes`` of N(0, 1) float32 weights.

    The weights are split into variables ``w[0], w[1], ...`` of shape
    ``[rows, k]`` and at most ``chunk_mib`` MiB each (generated by TensorFlow's
    stateless RNG from ``(seed, i)``, so no extra NumPy copy), all saved into
    ``variables/variables.data-00000-of-00001``. The total is ``size_bytes``
    rounded down to a multiple of ``4 * k`` (at least ``k * k`` floats).
    Gaussian float32 weights compress like trained ones (gzip ratio ~0.92).

    ``obj(x)`` for ``x`` ``[batch, k]`` float32 returns
    ``x @ w[0][:k] + sum_i w[i][0]`` (``[batch, k]``): cheap, yet it reads every
    variable. ``signatures["serving_default"](x=...)`` returns
    ``{"default": obj(x)}``. Also ``variables`` and ``trainable_variables``.

    Memory: ``tf.saved_model.save`` needs every variable alive, so the peak is
    about ``size_bytes`` plus a few chunks on top of TensorFlow itself (2 GiB:
    2.9 GB peak RSS, of which ~0.5 GB is ``import tensorflow``; built in
    ~18 s on 2 cores; 256 MiB: ~4 s).

    Returns:
      ``path`` as a string.
    """
    tf = _tf()
    path = _fresh_dir(path)
    if chunk_mib <= 0 or k <= 0:
        raise ValueError("chunk_mib and k must be positive")
    total_rows = max(int(size_bytes) // (4 * k), k)
    rows_per_chunk = max((chunk_mib * _MIB) // (4 * k), k)
    sizes: List[int] = []
    left = total_rows
    while left > 0:
        n = min(rows_per_chunk, left)
        sizes.append(n)
        left -= n
    if sizes[0] < k:  # cannot happen given the max() above, kept as a guard
        raise ValueError("first variable too small")

    class GaussianModel(tf.train.Checkpoint):
        def __init__(self):
            super().__init__()
            ws = []
            for i, n in enumerate(sizes):
                ws.append(
                    tf.Variable(
                        tf.random.stateless_normal([n, k], seed=[seed, i], dtype=tf.float32),
                        trainable=True,
                        name=f"w{i}",
                    )
                )
            self.w = ws
            self.variables = list(ws)
            self.trainable_variables = list(ws)

        @tf.function(input_signature=[tf.TensorSpec([None, k], tf.float32, name="x")])
        def __call__(self, x):
            y = tf.matmul(x, self.w[0][:k])
            for w in self.w:
                y = y + w[0]
            return y

        @tf.function(input_signature=[tf.TensorSpec([None, k], tf.float32, name="x")])
        def serve(self, x):
            return {"default": self.__call__(x)}

    model = GaussianModel()
    tf.saved_model.save(model, path, signatures={"serving_default": model.serve})
    return path


# ---------------------------------------------------------------------------
# 6. Packing
# ---------------------------------------------------------------------------

def _pack_module() -> Any:
    """``hubfast.pack`` (standard library only), also when the package itself cannot be
    imported (e.g. its native module is not built): then it is loaded from its file."""
    try:
        from hubfast import pack as pack_mod  # noqa: PLC0415

        return pack_mod
    except ImportError:  # pragma: no cover - depends on the state of the package
        import importlib.util  # noqa: PLC0415
        import sys  # noqa: PLC0415

        name = "hubfast_pack_standalone"
        if name in sys.modules:
            return sys.modules[name]
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "pack.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module


def _iter_tree(src: str) -> Iterator[Tuple[str, str]]:
    """``(abspath, relpath)`` in the order ``hubfast pack`` writes them."""
    return _pack_module()._iter_tree(src)


def pack_tar(
    src_dir: PathLike,
    out_path: PathLike,
    compression: str = "gz",
    level: Optional[int] = None,
    zstd_frame_size: Optional[int] = None,
    member_prefix: str = "./",
    *,
    tar_format: int = tarfile.GNU_FORMAT,
    mtime: Optional[int] = None,
    gzip_tool: Optional[str] = "gzip",
) -> str:
    """Packs ``src_dir`` into a tfhub.dev-like tar archive at ``out_path``.

    A thin wrapper of :func:`hubfast.pack.pack` (which ``hubfast pack`` uses).
    Members are ``member_prefix`` + the path relative to ``src_dir``, depth
    first in sorted order, with the root itself first as ``./`` (for the
    default prefix): ``./``, ``./assets/``, ..., ``./saved_model.pb``,
    ``./variables/``, ``./variables/variables.data-00000-of-00001``, ...
    (like ``tar -C src_dir -c .``). Owners are 0/0 without names; ``mtime``
    (an int) replaces every member's modification time when given, which
    makes the archive reproducible. ``tar_format`` defaults to GNU tar's.

    Args:
      compression: ``"gz"`` (one gzip member; by default the ``gzip`` tool at
        ``-6`` as in ``tar | gzip -6``, with ``-n``; Python's ``gzip`` module
        when ``gzip_tool`` is None or not installed: same format, different
        deflate stream), ``"zst"`` (``zstandard``; one frame, or with
        ``zstd_frame_size`` independent frames of that many uncompressed bytes,
        each with content size and checksum, and no seek table), ``"bz2"``,
        ``"xz"`` or ``"none"``.
      level: compression level; defaults gz 6, zst 3, bz2 9, xz 6.
      zstd_frame_size: only for ``"zst"``.
      member_prefix: ``"./"`` like tfhub.dev; ``""`` gives bare names and no
        root entry; ``"model/"`` puts everything under ``model/``.
      gzip_tool: the gzip-compatible command to run (``"gzip"``, ``"pigz"``,
        ``"igzip"``; each makes a different stream), or None for Python's.

    The tar is streamed into the compressor; memory stays small (plus a few
    frames for multi-frame zstd). Returns ``out_path`` as a string.
    """
    if zstd_frame_size is not None and compression != "zst":
        raise ValueError("zstd_frame_size only applies to compression='zst'")
    if compression not in ("gz", "zst", "bz2", "xz", "none"):
        raise ValueError(f"unknown compression {compression!r}")
    tool = gzip_tool if gzip_tool and shutil.which(gzip_tool) else "python"
    result = _pack_module().pack(
        src_dir, out_path, compression=compression, level=level,
        frame_size=int(zstd_frame_size) if zstd_frame_size else None, seek_table=False,
        gzip_tool=tool, member_prefix=member_prefix, tar_format=tar_format, mtime=mtime,
        allow_links=True)
    return result["path"]


def zstd_frame_count(path: PathLike) -> int:
    """Counts the frames of a zstd file (skippable frames included).

    Walks the file frame by frame, decompressing each to find where it ends
    (output discarded), so memory stays bounded for multi-GiB files.
    """
    import zstandard  # noqa: PLC0415

    dctx = zstandard.ZstdDecompressor()
    count = 0
    with open(os.fspath(path), "rb") as f:
        pending = b""
        while True:
            if len(pending) < 8:
                pending += f.read(1 << 20)
            if not pending:
                return count
            magic = int.from_bytes(pending[:4], "little")
            if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
                skip = 8 + int.from_bytes(pending[4:8], "little")
                while len(pending) < skip:
                    more = f.read(1 << 20)
                    if not more:
                        raise ValueError("truncated skippable frame")
                    pending += more
                pending = pending[skip:]
                count += 1
                continue
            dobj = dctx.decompressobj()
            block = pending
            while True:
                dobj.decompress(block)
                if dobj.eof:
                    break
                block = f.read(1 << 20)
                if not block:
                    raise ValueError("truncated zstd frame")
            pending = dobj.unused_data
            count += 1


# ---------------------------------------------------------------------------
# 7. Tree digests
# ---------------------------------------------------------------------------


def tree_digest(
    directory: PathLike, include_dirs: bool = False
) -> Dict[str, Tuple[int, str]]:
    """Maps each regular file under ``directory`` to ``(size, sha256 hex)``.

    Keys are POSIX relative paths (``"variables/variables.index"``). Symlinks
    map to ``(-1, "symlink:" + target)``. With ``include_dirs``, directories
    appear as ``"sub/"`` -> ``(0, "")`` so empty directories count too. Two
    trees are byte-for-byte equal when their digests are equal.
    """
    root = os.fspath(directory)
    result: Dict[str, Tuple[int, str]] = {}
    for full, rel in _iter_tree(root):
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            result[rel] = (-1, "symlink:" + os.readlink(full))
        elif stat.S_ISDIR(st.st_mode):
            if include_dirs:
                result[rel + "/"] = (0, "")
        elif stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(full, "rb") as f:
                while True:
                    block = f.read(1 << 20)
                    if not block:
                        break
                    h.update(block)
            result[rel] = (st.st_size, h.hexdigest())
    return result
