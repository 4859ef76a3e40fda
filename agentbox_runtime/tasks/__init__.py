"""Ordered ``podman run`` argv builders for every task kind (reference 6.2, 6.4, 8.2)."""
