"""piece-scheduler: knows which peer holds which piece, and tells peers whom to fetch from."""
