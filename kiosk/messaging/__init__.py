"""The messaging layer: wire schema, typed channels, every ZeroMQ socket and its CurveZMQ keys."""
