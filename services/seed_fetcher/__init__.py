"""seed-fetcher: the only service that goes back to the origin; takes jobs from a JetStream work queue."""
