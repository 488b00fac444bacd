"""One machine's agent (`myco node`, built by `app.build`: store, capability, hardware, runner
pool, announce, pairing) and the programs it starts, each in a folder of its own: runner/ (the
model runner child) and lending/ (the lending side and its RPC worker child); default_model is
the model installer, `python -m nodeagent.default_model [DIR]`."""
