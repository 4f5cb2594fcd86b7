"""The long-running processes: capture, verifier, subscriber, the supervisor (kiosk run) and what they serve."""
