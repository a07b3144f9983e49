"""Models that leave gpurnn: an ONNX graph for inference, and the weights under the names of PyTorch's
word_language_model ``RNNModel`` (a safetensors file), with the way back from such a file.

Export is a translation of the layer specs, not a second model: each layer type's plugin says, through
the `gpurnn_layer_exports` hook, how the type is written out (`layer`); `onnx_graph` assembles a
model's graph from that; `torch_names` maps a model onto RNNModel's parameter names and back;
`safetensors_file` writes and reads the safetensors format without a dependency; `commands` holds what
``gpurnn export`` and ``gpurnn import-torch`` do. Importing this package never imports onnx or torch.
"""

from .layer import LayerExport, RecurrentExport, identity_at_inference

__all__ = ["LayerExport", "RecurrentExport", "identity_at_inference"]
