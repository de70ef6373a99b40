"""cache-store: a node's piece store and upload server; the node's identity as a peer."""
