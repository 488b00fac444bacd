"""The shared kernel: what the gateway and the node agent both use, and nothing above them.

The contract between them (protocol), the error tree and its envelope (errors, handlers),
identities and mutual TLS (identity, tls), serving and relaying HTTP (serve, guard, proxy),
llama.cpp's layer arithmetic (layers), child processes that die with their parent (lifeline).
Imports point down only: mycoswarm (the command) -> gateway, nodeagent -> myco.
"""
