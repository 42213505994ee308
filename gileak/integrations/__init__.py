"""Bridges from federated-learning frameworks to gileak's attacks (each needs its own extra)."""
