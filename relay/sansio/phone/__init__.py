"""The phone link without I/O: checked frames and a reliable record transport over them.

:mod:`relay.sansio.phone.frame` cuts an 8-bit byte stream into checked frames and finds
them again after damage or line noise; :mod:`relay.sansio.phone.link` carries records
over those frames reliably, in order and in both directions at once.  Neither knows
anything of mail: the session engine that speaks the mail protocol sits on top.
"""
