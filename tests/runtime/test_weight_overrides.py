"""Initializer overrides at load time (``Backend.load(..., initializers=)``): what textual inversion (and
later LoRA) patches weights with, without touching the ONNX files; and the torch-free initializer reader."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.errors import UserError
from sdrt.runtime.backends import get_backend
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.onnx_weights import graph_initializers


def _table(engine):
    m = Manifest.load(engine)
    record = m.component("text_encoder")["token_embedding"]
    return m, record["initializer"], graph_initializers(m.graph_path("text_encoder"))[record["initializer"]].read()


def _ids(manifest, *tokens):
    n = manifest.model.text_max_length
    row = [manifest.data["tokenizer"]["bos_token_id"], *tokens, manifest.data["tokenizer"]["eos_token_id"]]
    return np.array([row + [manifest.model.pad_token_id] * (n - len(row))], np.int64)


@pytest.mark.parametrize("component", ["text_encoder", "vae_decoder"])  # weights inside the graph / in a data file
def test_the_reader_agrees_with_onnx(sd1_engine, component):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    m = Manifest.load(sd1_engine)
    path = m.graph_path(component, "cpu")
    ours = graph_initializers(path)
    theirs = {t.name: numpy_helper.to_array(t, base_dir=str(path.parent))
              for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    assert set(ours) == set(theirs) and len(ours) > 10
    for name, value in theirs.items():
        assert ours[name].shape == value.shape and ours[name].dtype == str(value.dtype), name
        np.testing.assert_array_equal(ours[name].read(), value)


def test_export_records_the_token_embedding_table(engine_dirs):
    for kind, engine in engine_dirs.items():
        m, name, table = _table(engine)
        assert table.shape == (49408, m.model.text_hidden_size), kind
        assert m.component("text_encoder")["token_embedding"]["shape"] == list(table.shape)


@pytest.mark.parametrize("backend", ["cpu", "openvino"])
def test_an_override_replaces_the_initializer_rows_included(sd1_engine, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    m, name, table = _table(sd1_engine)
    plain = get_backend("cpu").load(m, "text_encoder")
    grown = np.concatenate([table, table[[320, 1125]]])  # two new rows: copies of "a" and "photo"
    grown[1125] = table[320]                              # and an old row changed
    session = get_backend(backend).load(m, "text_encoder", initializers={name: grown})
    want = plain.run({"input_ids": _ids(m, 320, 320)})["last_hidden_state"]
    for ids in (_ids(m, 49408, 1125), _ids(m, 320, 1125)):
        got = session.run({"input_ids": ids})["last_hidden_state"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # without the override the same ids read the original rows
    assert not np.allclose(plain.run({"input_ids": _ids(m, 320, 1125)})["last_hidden_state"], want, atol=1e-3)


@pytest.mark.parametrize("backend", ["cpu", "openvino"])
def test_overrides_are_checked_against_the_graph(sd1_engine, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    m, name, table = _table(sd1_engine)
    with pytest.raises(UserError, match="has no initializer 'nope'"):
        get_backend(backend).load(m, "text_encoder", initializers={"nope": table})
    with pytest.raises(UserError, match=r"is float32 \[49408, 32\]; its replacement is float64"):
        get_backend(backend).load(m, "text_encoder", initializers={name: table.astype(np.float64)})


def test_an_unreadable_graph_is_a_user_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x3a\xff\xff\xff\xff\x0f")  # field 7, a length past the end
    with pytest.raises(UserError, match="not a readable ONNX graph"):
        graph_initializers(bad)
