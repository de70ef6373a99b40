"""chunk-fuse agent: a node's lazy FUSE mounts of converted images."""
