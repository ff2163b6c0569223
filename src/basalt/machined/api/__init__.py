"""The node's gRPC API: servicers, mTLS, authorization, forwarding, maintenance mode.

This is the one place where errors become gRPC status codes.
"""
