"""The progress bar's label names the model: the end of the handle, never a cut host."""
from __future__ import annotations

from hubfast import progress


def test_label_is_the_end_of_the_handle() -> None:
    assert progress.label("https://tfhub.dev/google/nnlm-en-dim50/2") == "google/nnlm-en-dim50/2"
    assert progress.label("http://127.0.0.1:39495/hubfast-demo/gaussian/1") == "hubfast-demo/gaussian/1"
    assert progress.label("https://www.kaggle.com/models/google/bert/tensorFlow2/en-uncased-l-12/3"
                          "?tf-hub-format=compressed") == ".../bert/tensorFlow2/en-uncased-l-12/3"
    assert progress.label("/models/my_model.tar.gz") == "models/my_model.tar.gz"
    long = "x" * 100 + ".tar.gz"
    got = progress.label("https://h/" + long)
    assert got.endswith(".tar.gz") and len(got) <= 40 and got.startswith(".../")
    assert progress.label("https://example.com:8443/a/b/c") == "a/b/c"
