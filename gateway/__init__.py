"""The OpenAI-compatible front door: policy, resolver, swarm view, forwarder, app wiring."""
