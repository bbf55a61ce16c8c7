"""The worker role: replay, evaluate assigned members, sign and submit rewards."""
