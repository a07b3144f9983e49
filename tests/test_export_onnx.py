"""`gpurnn export CHECKPOINT OUT.onnx`: ONNX Runtime on the exported graph gives gpurnn's logits and
carried states, block after block; the graph is what it says it is; bad input is one line, exit 2."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from gpurnn.export.onnx_graph import OPSET
from gpurnn.train.checkpoint import load_checkpoint

from .exportkit import EMBEDDING, EXAMPLE_PLUGIN, MODELS, PLUGIN_MODELS, all_checkpoints, gpurnn_model, \
    plugins_of, random_checkpoint, relative_difference, tiny_corpus, unfused_twin
from .faultkit import assert_one_line_error, cli, litter

onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'gpurnn[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the test extra has it)")

LOGIT_TOLERANCE = 1e-5  # relative to the largest logit, in float32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return all_checkpoints(tmp_path_factory.mktemp("onnx"))[1]


def exported(ck, folder, *plugin):
    path = folder / f"{ck.stem}.onnx"
    code, out, err = cli(*plugin, "export", ck, path)
    assert code == 0 and err == "", err
    assert out.startswith(f"wrote {path}, ") and f"ONNX opset {OPSET}" in out
    return path


def largest_logit_difference(model, path, blocks):
    """Run gpurnn and ONNX Runtime side by side over `blocks`, each starting from the states the one
    before left (zeros first); the largest relative logit difference. Asserts the states agree.
    gpurnn's logits: for a model ending in the fused output layer, its unfused twin's."""
    model = unfused_twin(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    state_names = [value.name for value in session.get_inputs()][1:]
    states = {name: np.zeros((blocks[0].shape[0], value.shape[1]), np.float32)
              for name, value in zip(state_names, session.get_inputs()[1:])}
    model.reset_state()
    worst = 0.0
    for block in blocks:
        expected = model.predict(block.astype(np.int32))
        outputs = dict(zip([value.name for value in session.get_outputs()],
                           session.run(None, {"ids": block.astype(np.int64), **states})))
        assert outputs["logits"].shape == expected.shape
        worst = max(worst, relative_difference(outputs["logits"], expected))
        carried = model.get_state()
        assert sorted(carried) == sorted(state_names)
        for name in state_names:
            states[name] = outputs[name + ".next"]
            assert relative_difference(states[name], carried[name]) < LOGIT_TOLERANCE, name
    return worst


@pytest.mark.parametrize("kind", [*MODELS, *PLUGIN_MODELS])
def test_onnx_runtime_gives_gpurnns_logits_over_two_blocks_with_the_state_carried(checkpoints, tmp_path, kind):
    path = exported(checkpoints[kind], tmp_path, *plugins_of(kind))
    model = gpurnn_model(checkpoints[kind], kind)
    ids = np.random.default_rng(3).integers(0, model.vocab_size, (3, 13))
    worst = largest_logit_difference(model, path, [ids[:, :7], ids[:, 7:]])  # two lengths: time is dynamic
    print(f"{kind}: largest logit difference {worst:.1e} relative to the largest logit")
    assert worst < LOGIT_TOLERANCE
    assert litter(tmp_path) == []


def test_the_graph_declares_its_opset_passes_the_checker_and_names_its_values(checkpoints, tmp_path):
    path = exported(checkpoints["better-rnnlm"], tmp_path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", OPSET)]
    inputs = {value.name: value.type.tensor_type for value in proto.graph.input}
    outputs = {value.name: value.type.tensor_type for value in proto.graph.output}
    assert list(inputs) == ["ids", "lstm1.h", "lstm1.c", "lstm2.h", "lstm2.c"]
    assert list(outputs) == ["logits", "lstm1.h.next", "lstm1.c.next", "lstm2.h.next", "lstm2.c.next"]
    assert inputs["ids"].elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in inputs["ids"].shape.dim] == ["batch", "time"]
    assert [d.dim_param or d.dim_value for d in outputs["logits"].shape.dim] == ["batch", "time", 17]
    assert [d.dim_param or d.dim_value for d in inputs["lstm2.c"].shape.dim] == ["batch", 12]
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("LSTM") == 2 and ops.count("Gather") == 1 and "Dropout" not in ops
    tables = [t.name for t in proto.graph.initializer if list(t.dims) == [17, 12]]
    assert tables == ["embedding.W"]  # the tied output affine reads it: stored once
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["gpurnn.vocab"]) == load_checkpoint(checkpoints["better-rnnlm"]).vocab
    assert props["gpurnn.level"] == "word" and json.loads(props["gpurnn.specs"])[1] == {"type": "dropout", "p": 0.5}


def test_gru_gates_follow_pytorchs_formulation(checkpoints, tmp_path):
    proto = onnx.load(str(exported(checkpoints["gru"], tmp_path)))
    grus = [node for node in proto.graph.node if node.op_type == "GRU"]
    assert len(grus) == 2
    for node in grus:
        assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["linear_before_reset"] == 1


def test_a_layer_type_without_an_export_is_named_in_one_line(checkpoints, tmp_path):
    plugin = tmp_path / "scale_layers.py"
    plugin.write_text(Path(EXAMPLE_PLUGIN[1]).read_text().replace(
        "def gpurnn_layer_exports", "def not_an_export_hook"))  # the same layers, no exports
    out = tmp_path / "m.onnx"
    code, _, err = cli("--plugin", plugin, "export", checkpoints["plugin"], out)
    assert_one_line_error(code, err, "layer 'relu_rnn' (type 'relu_rnn', from plugin", "has no ONNX export",
                          "gpurnn_layer_exports")
    assert not out.exists() and litter(tmp_path) == []


def test_a_loss_layer_without_an_export_is_refused_rather_than_its_input_taken_for_logits(tmp_path):
    """The adaptive softmax computes its own scores from features: with no export of its own it is
    refused in one line, never written out with the hidden features as `logits`."""
    corpus = tiny_corpus(tmp_path)
    ck = random_checkpoint(tmp_path, "adaptive", corpus, [EMBEDDING, {"type": "rnn", "hidden_size": 8},
                                                          {"type": "adaptive_softmax_loss", "cutoffs": [6]}])
    out = tmp_path / "m.onnx"
    code, _, err = cli("export", ck, out)
    assert_one_line_error(code, err, "layer 'adaptive_softmax_loss' (type 'adaptive_softmax_loss', from plugin",
                          "has no ONNX export")
    assert not out.exists() and litter(tmp_path) == []


def test_without_the_onnx_package_the_error_says_what_to_install(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    code, _, err = cli("export", checkpoints["rnnlm"], tmp_path / "m.onnx")
    assert_one_line_error(code, err, "pip install 'gpurnn[onnx]'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case, fragment", [
    ("the checkpoint itself", "is both the export to write and the checkpoint"),
    ("missing folder", "cannot write ONNX file"),
    ("unknown suffix", "cannot tell the format from"),
    ("not a checkpoint", "is not a readable gpurnn checkpoint"),
])
def test_bad_paths_are_one_line_and_write_nothing(checkpoints, tmp_path, case, fragment):
    ck = tmp_path / "ck.h5"
    ck.write_bytes(checkpoints["rnnlm"].read_bytes())
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    source, output = {"the checkpoint itself": ("ck.h5", "ck.h5"), "missing folder": ("ck.h5", "no/such/m.onnx"),
                      "unknown suffix": ("ck.h5", "m.bin"),
                      "not a checkpoint": ("notes.txt", "m.onnx")}[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = cli("export", tmp_path / source, tmp_path / output)
    assert_one_line_error(code, err, fragment)
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == before
