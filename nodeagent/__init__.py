"""One machine's agent: hardware, capability, model store, model runners."""
