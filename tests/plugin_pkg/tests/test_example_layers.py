"""The plugin's own tests: gpurnn's conformance kit on each layer type it provides."""

import pytest

from gpurnn.testing import check_layer


@pytest.mark.parametrize("layer_type, options", [("relu_rnn", {"hidden_size": 4}), ("residual", {})])
def test_layer_keeps_the_gpurnn_layer_contract(layer_type, options):
    report = check_layer(layer_type, options, plugins=["gpurnn_example_layers"])
    assert max(report["grad_errors"].values()) < 1e-5
    assert report["stateful"] == (layer_type == "relu_rnn")
