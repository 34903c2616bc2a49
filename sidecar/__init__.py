"""
token-sidecar: one OAuth2 client-credentials token, fetched once, kept
fresh and served to the processes beside it on loopback.
"""

__version__ = "0.1.0"
