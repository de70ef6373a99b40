"""registry-proxy: a node's OCI registry mirror; blobs come through the P2P network."""
