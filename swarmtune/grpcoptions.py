"""The gRPC options both ends of a connection set: message size bounds and keepalive pings."""

from __future__ import annotations

GrpcOptions = list[tuple[str, int]]


def connection_options(max_receive_bytes: int, max_send_bytes: int, keepalive_s: int, keepalive_timeout_s: int) -> GrpcOptions:
    """Bounded messages, and a ping after `keepalive_s` without a byte that closes the connection when
    unanswered for `keepalive_timeout_s`: a half-open link (a NAT or proxy that stopped forwarding
    without closing) is noticed within their sum, on idle connections too (a subscription carries
    nothing between iterations). gRPC waits for a ping's answer for its *ping* timeout (default 60 s),
    whatever the keepalive timeout says, so both are set."""
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", max_send_bytes),
        ("grpc.keepalive_time_ms", keepalive_s * 1000),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_s * 1000),
        ("grpc.http2.ping_timeout_ms", keepalive_timeout_s * 1000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
