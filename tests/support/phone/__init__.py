"""The phone tests' in-memory doubles: a lossy line, a perfect link, a store, two sessions."""
