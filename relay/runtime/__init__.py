"""Small shims over Twisted's runtime: reactor, transports, log observer, service tree.

Each module here leans on Twisted beyond its documented API (see README.md beside this
file for the private attributes each one reads) and has a test that fails CI when a
Twisted release moves them.  Everything else in the relay uses Twisted's public API only.
"""
