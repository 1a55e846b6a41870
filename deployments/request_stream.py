"""RequestStream: the requests of one call at one hop, and the items coming back for them.

Every hop (the ingress for an HTTP request, the BatchingRouter and the AttentionReplica for a streaming call)
holds its call's requests the same way: whoever feeds it `put`s each engine step's items as one list; the
call drains whatever piled up with `next()`, and a request whose last item it drained is no longer open. A request
that must stop early (its client left, a stop string ended it, the call is being closed) is aborted with one call,
`abort` or `close`, which tells the next hop downstream once, for all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping

from gptoss_serve.cluster.engine_protocol import StreamItem


class RequestStream:
    def __init__(self, request_ids: Iterable[str], *, abort: Callable[[list[str]], None],
                 on_close: Callable[[], None] | None = None) -> None:
        """abort(ids): stops those requests downstream (one call per abort). on_close: runs once, at `close`."""
        self.request_ids = list(request_ids)  # in the order given
        self.open = set(self.request_ids)  # neither finished (last item drained) nor aborted
        self._abort_downstream, self._on_close = abort, on_close
        self._items: list[StreamItem] = []
        self._wake = asyncio.Event()
        self.closed = False

    def put(self, items: list[StreamItem]) -> None:
        """One step's items for requests of this stream (from the hop's downstream side)."""
        self._items += items
        self._wake.set()

    async def next(self) -> list[StreamItem]:
        """Every item that arrived since the last call, waiting for one while requests are open; [] once none is
        open (e.g. the last ones were aborted meanwhile)."""
        while not self._items and self.open:
            self._wake.clear()
            await self._wake.wait()
        items, self._items = self._items, []
        self.open.difference_update(item.request_id for item in items if item.is_last)
        return items

    async def steps(self) -> AsyncIterator[list[StreamItem]]:
        """Each drain that brought items, until no request is open."""
        while self.open:
            if items := await self.next():
                yield items

    def abort(self, request_ids: Iterable[str]) -> None:
        """Stops these of its requests that are still open, downstream too; their later items are dropped."""
        ids = [request_id for request_id in request_ids if request_id in self.open]
        if not ids:
            return
        self.open.difference_update(ids)
        aborted = set(ids)
        self._items = [item for item in self._items if item.request_id not in aborted]
        self._wake.set()
        self._abort_downstream(ids)

    def close(self) -> None:
        """Stops whatever is still open (the caller went away, or the call ended); idempotent."""
        self.abort(list(self.open))
        if not self.closed:
            self.closed = True
            if self._on_close is not None:
                self._on_close()


def abort_where_they_are(streams: Mapping[str, RequestStream], request_ids: Iterable[str]) -> list[str]:
    """Aborts requests in the streams they belong to (request id -> stream), one abort per stream; returns the ids
    found (unknown ones, already finished or never seen, are ignored)."""
    by_stream: dict[int, tuple[RequestStream, list[str]]] = {}
    for request_id in request_ids:
        if (stream := streams.get(request_id)) is not None:
            by_stream.setdefault(id(stream), (stream, []))[1].append(request_id)
    for stream, ids in by_stream.values():
        stream.abort(ids)
    return [request_id for _, ids in by_stream.values() for request_id in ids]
