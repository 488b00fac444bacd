"""The `myco` command: the composition root on top of the gateway and the node agent."""
