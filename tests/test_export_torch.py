"""`gpurnn export --format torch` and `gpurnn import-torch`: PyTorch RNNModel weights in safetensors.

The round trip scores bit for bit; PyTorch's own modules, loaded from the file, give gpurnn's logits;
a model trained in PyTorch (two biases each) imports to the same logits; bad files are one line."""

import json
import subprocess
import sys

import numpy as np
import pytest

from gpurnn.export.safetensors_file import read_safetensors, write_safetensors
from gpurnn.train.checkpoint import load_checkpoint

from .exportkit import AFFINE, EMBEDDING, LOSS, MODELS, all_checkpoints, gpurnn_model, model_config, plugins_of, \
    relative_difference, unfused_twin
from .faultkit import assert_one_line_error, cli, litter

LOGIT_TOLERANCE = 1e-5
ROUND_TRIP = [*MODELS, "relu"]  # every model laid out as RNNModel, a plugin's recurrent type among them


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(corpus, checkpoints, {kind: its exported safetensors file})."""
    folder = tmp_path_factory.mktemp("torch")
    corpus, cks = all_checkpoints(folder)
    files = {}
    for kind in ROUND_TRIP:
        files[kind] = folder / f"{kind}.safetensors"
        code, out, err = cli(*plugins_of(kind), "export", cks[kind], files[kind], "--format", "torch")
        assert code == 0 and err == "", err
        assert "PyTorch RNNModel(rnn_type=" in out
    return corpus, cks, files


def score(ck, corpus, kind):
    code, out, err = cli(*plugins_of(kind), "eval", ck, corpus, "--json")
    assert code == 0, err
    return json.loads(out)["perplexity"]


@pytest.mark.parametrize("kind", ROUND_TRIP)
def test_export_then_import_gives_the_same_perplexity_bit_for_bit(made, tmp_path, kind):
    corpus, cks, files = made
    back = tmp_path / "back.h5"
    code, out, err = cli(*plugins_of(kind), "import-torch", files[kind], back)
    assert code == 0 and err == "" and out.startswith(f"wrote {back}: "), err
    original, imported = load_checkpoint(cks[kind]), load_checkpoint(back)
    # import-torch builds the presets' output layer, the fused affine_softmax_loss: a model of the two
    # layers affine + softmax_loss comes back fused, the same parameters under that layer's names
    fused = original.meta["specs"][-1]["type"] == "affine_softmax_loss"
    renamed = {name if fused else name.replace("affine.", "affine_softmax_loss."): value
               for name, value in original.params.items()}
    assert imported.params.keys() == renamed.keys() and imported.vocab == original.vocab
    for name, value in renamed.items():
        np.testing.assert_array_equal(imported.params[name], value, err_msg=name)
    expected = score(cks[kind], corpus, kind)  # bit for bit, or from the pair to rounding
    assert score(back, corpus, kind) == (expected if fused else pytest.approx(expected, rel=1e-6))
    assert imported.meta["stripped"] and imported.meta["imported_from"] == str(files[kind])
    samples = [cli(*plugins_of(kind), "generate", ck, "--length", 8, "--seed", 2) for ck in (cks[kind], back)]
    assert samples[0] == samples[1] and samples[0][0] == 0
    assert litter(tmp_path) == []


def test_the_file_holds_rnnmodels_names_shapes_and_constructor_arguments(made):
    _, cks, files = made
    tensors, metadata = read_safetensors(files["better-rnnlm"])
    assert list(tensors) == ["encoder.weight", *(f"rnn.{k}_l{n}" for n in (0, 1) for k in
                                                 ("weight_ih", "weight_hh", "bias_ih", "bias_hh")),
                             "decoder.weight", "decoder.bias"]
    assert tensors["rnn.weight_ih_l0"].shape == (48, 12) and tensors["decoder.weight"].shape == (17, 12)
    assert json.loads(metadata["rnn_model"]) == {"rnn_type": "LSTM", "ntoken": 17, "ninp": 12, "nhid": 12,
                                                 "nlayers": 2, "dropout": 0.5, "tie_weights": True}
    assert json.loads(metadata["vocab"]) == load_checkpoint(cks["better-rnnlm"]).vocab
    assert metadata["level"] == "word" and metadata["format"] == "pt"
    saved = load_checkpoint(cks["better-rnnlm"]).params
    np.testing.assert_array_equal(tensors["rnn.weight_hh_l1"], saved["lstm2.Wh"].T)  # (out, in), same gate order
    np.testing.assert_array_equal(tensors["rnn.bias_ih_l1"], saved["lstm2.b"])
    assert not tensors["rnn.bias_hh_l1"].any()
    np.testing.assert_array_equal(tensors["decoder.weight"], tensors["encoder.weight"])  # tied
    gru, gru_saved = read_safetensors(files["gru"])[0], load_checkpoint(cks["gru"]).params
    np.testing.assert_array_equal(gru["rnn.bias_hh_l1"][24:], gru_saved["gru2.bhn"])  # b_hn: the n part
    assert not gru["rnn.bias_hh_l1"][:24].any()


def test_importing_sums_pytorchs_two_biases_and_keeps_grus_b_hn(made, tmp_path):
    _, _, files = made
    rng = np.random.default_rng(5)
    for kind, layer, gates in (("rnnlm", "lstm", 4), ("gru", "gru1", 3)):
        tensors, metadata = read_safetensors(files[kind])
        tensors = {name: rng.normal(size=value.shape).astype(np.float32) for name, value in tensors.items()}
        path = tmp_path / f"{kind}.safetensors"
        write_safetensors(path, tensors, metadata)
        code, _, err = cli("import-torch", path, tmp_path / f"{kind}.h5")
        assert code == 0, err
        params = load_checkpoint(tmp_path / f"{kind}.h5").params
        summed = tensors["rnn.bias_ih_l0"] + tensors["rnn.bias_hh_l0"]
        if gates == 3:
            H = 12
            np.testing.assert_array_equal(params[f"{layer}.b"][:2 * H], summed[:2 * H])
            np.testing.assert_array_equal(params[f"{layer}.b"][2 * H:], tensors["rnn.bias_ih_l0"][2 * H:])
            np.testing.assert_array_equal(params[f"{layer}.bhn"], tensors["rnn.bias_hh_l0"][2 * H:])
        else:
            np.testing.assert_array_equal(params[f"{layer}.b"], summed)
        np.testing.assert_array_equal(params[f"{layer}.Wx"], tensors["rnn.weight_ih_l0"].T)


def test_the_vocabulary_may_come_from_a_corpus_or_a_text_file(made, tmp_path):
    corpus, cks, files = made
    tensors, metadata = read_safetensors(files["rnnlm"])
    bare = tmp_path / "bare.safetensors"
    write_safetensors(bare, tensors, {"rnn_model": metadata["rnn_model"]})  # no vocab in the file
    code, _, err = cli("import-torch", bare, tmp_path / "x.h5")
    assert_one_line_error(code, err, "has no 'vocab' metadata: give --vocab")
    words = tmp_path / "words.txt"
    words.write_text("\n".join(json.loads(metadata["vocab"])) + "\n")
    for source in (corpus, words):
        out = tmp_path / f"from-{source.suffix[1:]}.h5"
        code, _, err = cli("import-torch", bare, out, "--vocab", source)
        assert code == 0, err
        assert load_checkpoint(out).vocab == load_checkpoint(cks["rnnlm"]).vocab
    words.write_text("<unk>\nthe\n")
    code, _, err = cli("import-torch", bare, tmp_path / "y.h5", "--vocab", words)
    assert_one_line_error(code, err, "the vocabulary has 2 tokens, but", "ntoken=17")


def rewritten(path, folder, change):
    """A copy of the safetensors file at `path`, `change(tensors, metadata)` applied."""
    tensors, metadata = read_safetensors(path)
    change(tensors, metadata)
    copy = folder / "changed.safetensors"
    write_safetensors(copy, tensors, metadata)
    return copy


def rnn_model_set(**values):
    def change(tensors, metadata):
        metadata["rnn_model"] = json.dumps({**json.loads(metadata["rnn_model"]), **values})
    return change


@pytest.mark.parametrize("change, fragment", [
    (lambda t, m: t.update({"rnn.weight_hh_l0": t["rnn.weight_hh_l0"][:, :-1]}),
     "tensor 'rnn.weight_hh_l0' has shape (48, 11); RNNModel(LSTM, ntoken=17, ninp=8, nhid=12, nlayers=1) "
     "needs (48, 12)"),
    (lambda t, m: t.pop("rnn.bias_hh_l0"), "has no tensor 'rnn.bias_hh_l0', which RNNModel(LSTM"),
    (lambda t, m: t.update({"rnn.weight_ih_l1": t["rnn.weight_ih_l0"]}), "tensor 'rnn.weight_ih_l1' has no place in"),
    (lambda t, m: t["decoder.bias"].__setitem__(0, np.nan), "tensor 'decoder.bias' is not finite floating point"),
    (lambda t, m: t.update({"decoder.bias": t["decoder.bias"].astype(np.int64)}),
     "is not finite floating point (int64)"),
    (rnn_model_set(rnn_type="RNN_RELU"), "unknown rnn_type 'RNN_RELU'; gpurnn has GRU, LSTM, RNN_TANH"),
    (rnn_model_set(nlayers=0), "RNNModel argument nlayers must be positive, not 0"),
    (rnn_model_set(nhid="12"), "RNNModel argument nhid is '12', not an integer"),
    (rnn_model_set(tie_weights=True), "tie_weights needs ninp == nhid, not 8 and 12"),
    (lambda t, m: m.pop("rnn_model"), "has no 'rnn_model' metadata"),
    (lambda t, m: m.update({"rnn_model": "{nope"}), "metadata 'rnn_model' is not JSON"),
    (lambda t, m: m.update({"vocab": json.dumps(["a", "a"])}), "the vocabulary has a repeated token"),
])
def test_a_file_gpurnn_cannot_use_is_refused_in_one_line_and_nothing_is_written(made, tmp_path, change, fragment):
    changed = rewritten(made[2]["rnnlm"], tmp_path, change)
    code, out, err = cli("import-torch", changed, tmp_path / "out.h5")
    assert_one_line_error(code, err, fragment)
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["changed.safetensors"]


def test_a_damaged_file_and_bad_outputs_are_refused_in_one_line(made, tmp_path):
    source = made[2]["rnnlm"]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(source.read_bytes()[:-3])
    (tmp_path / "notes.txt").write_text("mine\n")
    for args, fragment in (([cut, tmp_path / "a.h5"], "is not a valid safetensors file: its tensors hold"),
                           ([source, source], "is both the checkpoint to write and the safetensors file"),
                           ([source, tmp_path / "notes.txt"], "exists and is not a gpurnn checkpoint"),
                           ([source, tmp_path / "no" / "a.h5"], "does not exist")):
        code, _, err = cli("import-torch", *args)
        assert_one_line_error(code, err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("kind, fragment", [
    ("plugin", "layer 'residual' (type 'residual') has no counterpart in PyTorch's RNNModel"),
    ("mixed", "holds recurrent layers of one type and size; the model has lstm 12, lstm 8"),
])
def test_a_model_pytorchs_rnnmodel_cannot_hold_is_refused_in_one_line(made, tmp_path, kind, fragment):
    ck = made[1].get(kind)
    if kind == "mixed":
        ck = tmp_path / "mixed.h5"
        config = tmp_path / "mixed.toml"
        config.write_text(model_config([EMBEDDING, {"type": "lstm", "hidden_size": 12},
                                        {"type": "lstm", "hidden_size": 8}, AFFINE, LOSS]))
        code, _, err = cli("train", made[0], "--model-config", config, "--max-iters", 1, "--batch-size", 2,
                           "--time-size", 5, "--quiet", "--checkpoint", ck)
        assert code == 0, err
    out = tmp_path / "m.safetensors"
    code, _, err = cli(*plugins_of(kind), "export", ck, out)
    assert_one_line_error(code, err, fragment)
    assert not out.exists() and litter(tmp_path) == []


# PyTorch itself, where it is importable: its modules loaded from the file, and a model it trained.

def torch_module():
    return pytest.importorskip("torch", reason="torch is not installed: PyTorch's side of the export is not checked")


def rnn_model_class(torch):
    """PyTorch's word_language_model RNNModel (logits rather than log-probabilities out)."""
    nn = torch.nn

    class RNNModel(nn.Module):
        def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False):
            super().__init__()
            self.drop = nn.Dropout(dropout)
            self.encoder = nn.Embedding(ntoken, ninp)
            if rnn_type in ("LSTM", "GRU"):
                self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
            else:
                nonlinearity = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}[rnn_type]
                self.rnn = nn.RNN(ninp, nhid, nlayers, nonlinearity=nonlinearity, dropout=dropout)
            self.decoder = nn.Linear(nhid, ntoken)
            if tie_weights:
                self.decoder.weight = self.encoder.weight
            self.rnn_type, self.nhid, self.nlayers = rnn_type, nhid, nlayers

        def forward(self, ids, hidden):  # ids (T, B), as the example's batches
            output, hidden = self.rnn(self.drop(self.encoder(ids)), hidden)
            return self.decoder(self.drop(output)), hidden

        def init_hidden(self, batch):
            zeros = torch.zeros(self.nlayers, batch, self.nhid)
            return (zeros, zeros.clone()) if self.rnn_type == "LSTM" else zeros

    return RNNModel


def largest_logit_difference(torch, module, model, blocks):
    """gpurnn and the PyTorch module over consecutive blocks, each carrying its state (gpurnn's logits:
    for a model ending in the fused output layer, its unfused twin's)."""
    model = unfused_twin(model)
    module.eval()
    model.reset_state()
    hidden = module.init_hidden(blocks[0].shape[0])
    worst = 0.0
    with torch.no_grad():
        for block in blocks:
            logits, hidden = module(torch.from_numpy(block.T.astype(np.int64)), hidden)
            expected = model.predict(block.astype(np.int32))
            worst = max(worst, relative_difference(logits.numpy().transpose(1, 0, 2), expected))
    return worst


@pytest.mark.parametrize("kind", ROUND_TRIP)
def test_pytorchs_modules_loaded_from_the_file_give_gpurnns_logits(made, kind):
    torch = torch_module()
    from safetensors.torch import load_file

    _, cks, files = made
    _, metadata = read_safetensors(files[kind])
    module = rnn_model_class(torch)(**json.loads(metadata["rnn_model"]))
    module.load_state_dict(load_file(files[kind]))  # strict: every name and shape as PyTorch's
    ids = np.random.default_rng(4).integers(0, 17, (3, 13))
    worst = largest_logit_difference(torch, module, gpurnn_model(cks[kind], kind), [ids[:, :6], ids[:, 6:]])
    print(f"{kind}: PyTorch from the file, largest logit difference {worst:.1e} relative")
    assert worst < LOGIT_TOLERANCE


@pytest.mark.parametrize("rnn_type, nlayers, tie", [("LSTM", 2, True), ("GRU", 2, False), ("RNN_TANH", 1, False)])
def test_a_model_made_in_pytorch_imports_to_its_logits_and_scores(made, tmp_path, rnn_type, nlayers, tie):
    torch = torch_module()
    from safetensors.torch import save_model

    corpus = made[0]
    torch.manual_seed(0)
    args = {"rnn_type": rnn_type, "ntoken": 17, "ninp": 12, "nhid": 12, "nlayers": nlayers,
            "dropout": 0.2 * (nlayers > 1), "tie_weights": tie}
    module = rnn_model_class(torch)(**args)  # PyTorch's initialisation: both biases non-zero
    path = tmp_path / "theirs.safetensors"
    save_model(module, str(path), metadata={"rnn_model": json.dumps(args)})  # tied: keeps one copy
    code, _, err = cli("import-torch", path, tmp_path / "ours.h5", "--vocab", corpus)
    assert code == 0, err
    ids = np.random.default_rng(6).integers(0, 17, (2, 11))
    worst = largest_logit_difference(torch, module, gpurnn_model(tmp_path / "ours.h5"), [ids[:, :5], ids[:, 5:]])
    print(f"{rnn_type} x {nlayers} trained in PyTorch, imported: largest logit difference {worst:.1e} relative")
    assert worst < LOGIT_TOLERANCE
    code, out, err = cli("eval", tmp_path / "ours.h5", corpus, "--json")
    assert code == 0 and 1 < json.loads(out)["perplexity"], err
    assert cli("generate", tmp_path / "ours.h5", "--length", 5)[0] == 0


def test_importing_gpurnn_and_collecting_exports_imports_no_other_framework():
    code = ("import sys, gpurnn, gpurnn.cli, gpurnn.export.commands; from gpurnn.registry import Registry; "
            "Registry().layer_exports; print(sorted(m for m in ('onnx', 'onnxruntime', 'torch', 'safetensors', "
            "'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
