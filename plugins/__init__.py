"""gpurnn's built-in layer plugins (installed as the import package ``gpurnn_plugins``).

One module per layer family; each registers through the ``gpurnn`` entry-point group exactly as a
third party's plugin would.
"""
