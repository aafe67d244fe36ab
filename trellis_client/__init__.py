"""Trellis's Python client: `Client` (blocking) and `AsyncClient` (asyncio) over the router's gRPC API.

    from trellis_client import Client
    with Client("127.0.0.1:50051") as client:
        result = client.run("majority_vote", "What is 12 + 7?", params={"n": 8})
        print(result.answer, result.details["votes"])
"""

from trellis_client.async_client import AsyncClient, AsyncEventStream, AsyncRunHandle, AsyncSession
from trellis_client.errors import TrellisError
from trellis_client.requests import Sampling
from trellis_client.retry import Retry
from trellis_client.sync_client import Client, EventStream, RunHandle, Session
from trellis_client.types import (
    Candidate,
    CandidateScore,
    Catalog,
    Completion,
    ControllerInfo,
    Delta,
    Event,
    Failed,
    Final,
    Generation,
    Intermediate,
    ParamInfo,
    Progress,
    Result,
    Scores,
    Started,
    Timings,
    Usage,
)

__all__ = [
    "AsyncClient", "AsyncEventStream", "AsyncRunHandle", "AsyncSession", "Candidate", "CandidateScore", "Catalog",
    "Client", "Completion", "ControllerInfo", "Delta", "Event", "EventStream", "Failed", "Final", "Generation",
    "Intermediate", "ParamInfo", "Progress", "Result", "Retry", "RunHandle", "Sampling", "Scores", "Session",
    "Started", "Timings", "TrellisError", "Usage",
]
