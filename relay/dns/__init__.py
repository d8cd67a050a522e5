"""DNS for mail: MX resolution (RFC 5321 §5.1) with twisted.names."""
