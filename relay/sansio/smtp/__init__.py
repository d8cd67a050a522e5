"""SMTP without I/O: both protocol engines and what they share.

* :mod:`.state`: every state and move of the server and the client engine, as tables;
* :mod:`.events`: the events of both directions (one vocabulary: the client engine sends
  what the server engine returns); :mod:`.errors`: the errors and sentinels;
* :mod:`.wire`: the wire format (replies, command lines, dot-stuffing, xtext);
* :mod:`.commands`: command lines into events, given an explicit parse context;
* :mod:`.server`: the server engine, driven by :mod:`relay.gateway.protocol`;
* :mod:`.client`: the client engine, driven by :mod:`relay.channels.smtp.protocol`.
"""
