"""Devices lent for split inference over llama.cpp RPC: in the agent, leases (lender), lent
weights (rpccache) and the mutual-TLS tunnel (whose entrance split runners use); the RPC worker
child, `python -m nodeagent.lending.rpcworker`; rpc, the ctypes glue of both ends."""
