"""The coordinator role: iteration lifecycle, validation, shaping, ledger append, broadcast."""
