"""One way to run code around every call of a grpc.aio method handler, for the server's interceptors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

# Given the call's context, an async context manager entered before the handler runs and exited
# after it returns, raises or (for a stream) yields its last response.
Around = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]


def method_name(handler_call_details: grpc.HandlerCallDetails) -> str:
    """The method's short name ("Score" for "/offdpo.v1.RefScore/Score")."""
    return str(handler_call_details.method).rsplit("/", 1)[-1]


def wrap_handler(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler | None:
    """`handler` with every call run inside `around(context)`; None for a shape other than
    unary-unary or stream-stream (refscore has no other; the caller decides what to do with it)."""
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream:
        inner_stream = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with around(context):
                async for response in inner_stream(requests, context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )
    return None
