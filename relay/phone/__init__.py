"""The phone link's Twisted side: the call driver and a file-backed store."""
