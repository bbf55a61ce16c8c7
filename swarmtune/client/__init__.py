"""The client role: operator status, ledger audit with replay, export and plots."""
