"""The phone link's engines: frames, a reliable record link, and the mail session over it."""
