"""Channels: the ways mail leaves the relay, each an :class:`relay.interfaces.IChannel`."""
