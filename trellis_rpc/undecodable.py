"""Requests that do not parse get INVALID_ARGUMENT, not grpc's UNKNOWN.

grpc's aio server answers UNKNOWN ("Unexpected error ... DecodeError") when a request's bytes are not
a valid message: bad UTF-8 in a string field, a corrupt wire format, nesting past protobuf's recursion
limit. The interceptor swaps each handler's deserializer for one that keeps the error, and the handler
then refuses the request. The router installs it on its public API; worker links are the router's own.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError


class _Undecodable:
    """What the deserializer hands the handler instead of a request it could not parse."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """A request that does not parse (bad UTF-8 in a string field, corrupt wire format, nesting past the
    recursion limit) gets INVALID_ARGUMENT; grpc itself would answer UNKNOWN."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def deserialize(data):
            try:
                return parse(data)
            except DecodeError as err:
                return _Undecodable(err)

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request: not a valid {details.method.rsplit('/', 1)[-1]} request ({request.error})")

        if handler.unary_unary:
            inner = handler.unary_unary
            async def unary_unary(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                return await inner(request, context)
            return handler._replace(request_deserializer=deserialize, unary_unary=unary_unary)
        if handler.unary_stream:
            inner = handler.unary_stream
            async def unary_stream(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for reply in inner(request, context):
                    yield reply
            return handler._replace(request_deserializer=deserialize, unary_stream=unary_stream)
        if handler.stream_stream:
            inner = handler.stream_stream
            async def stream_stream(requests, context):
                async def checked():
                    async for request in requests:
                        if isinstance(request, _Undecodable):
                            await refuse(request, context)
                        yield request
                async for reply in inner(checked(), context):
                    yield reply
            return handler._replace(request_deserializer=deserialize, stream_stream=stream_stream)
        return handler
