"""The one-command demo: a local cluster, a following replica, its progress display and final report."""
