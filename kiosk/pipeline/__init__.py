"""The verifier's rules, with no sockets, files or threads: tracking, the decision policy, the core."""
