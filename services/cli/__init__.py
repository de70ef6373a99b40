"""The `damselfly` command line and the local-cluster supervisor."""
