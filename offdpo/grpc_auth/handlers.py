"""One way to run code around every call of a grpc.aio method handler, for the servers' interceptors.

`wrap_handler(handler, around)` keeps the handler's shape. `read_request_inside(handler)` turns a
unary-request handler into its streaming-request twin whose behaviour reads the one request itself:
what wraps it then runs *before* the request body is read and deserialised (grpc.aio reads a unary
request before it calls the behaviour; a streaming request only when the behaviour iterates). The
wire format is the same, so clients do not notice.
"""

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


def wrap_handler(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """`handler` with every call run inside `around(context)`, in the same shape."""
    de, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, de, ser)
    if handler.stream_unary:
        su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, de, ser)
    if handler.unary_stream:
        us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with around(context):
                async for response in us(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, de, ser)
    ss = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with around(context):
            async for response in ss(requests, context):
                yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, de, ser)


async def _one_request(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
    async for request in requests:
        return request
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message")


def read_request_inside(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """For a unary request: the same handler, except that the request is read by the behaviour (so
    code wrapped around it runs before the body is read). Streaming-request handlers are returned
    as they are: they already read their requests lazily."""
    de, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        uu = handler.unary_unary

        async def reads_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await uu(await _one_request(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(reads_unary, de, ser)
    if handler.unary_stream:
        us = handler.unary_stream

        async def reads_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in us(await _one_request(requests, context), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(reads_stream, de, ser)
    return handler
