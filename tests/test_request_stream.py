"""RequestStream: one call's requests at one hop (ingress, router, replica): items drained per step, finished ids
leave, an abort reaches the next hop once."""

from __future__ import annotations

import asyncio

from gptoss_serve.cluster.engine_protocol import RequestOutput, StreamItem


def output(request_id: str, tokens: list[int], *, finished: bool = False) -> StreamItem:
    return StreamItem(request_id, output=RequestOutput(request_id, tokens, None, finished))


def stream_of(ids, aborted: list[list[str]], closed: list[bool] | None = None):
    from gptoss_serve.deployments.request_stream import RequestStream

    return RequestStream(ids, abort=aborted.append, on_close=(lambda: closed.append(True)) if closed is not None
                         else None)


def test_next_drains_a_step_and_finished_requests_leave():
    async def main():
        aborted = []
        stream = stream_of(["a", "b"], aborted)
        stream.put([output("a", [1]), output("b", [2])])
        stream.put([output("a", [3], finished=True)])
        items = await stream.next()  # both puts at once: what piled up since the last call
        assert [(i.request_id, i.output.new_token_ids) for i in items] == [("a", [1]), ("b", [2]), ("a", [3])]
        assert stream.open == {"b"}
        stream.put([StreamItem("b", error="gone", status=503)])  # an error is a last item too
        assert [i.request_id for i in await stream.next()] == ["b"]
        assert not stream.open
        stream.close()
        assert aborted == []  # nothing was open: nothing to abort downstream

    asyncio.run(main())


def test_next_waits_for_items_and_wakes_when_the_last_open_request_is_aborted():
    async def main():
        aborted = []
        stream = stream_of(["a", "b"], aborted)
        waiter = asyncio.create_task(stream.next())
        await asyncio.sleep(0.01)
        assert not waiter.done()  # nothing arrived yet
        stream.put([output("a", [1])])
        assert [i.request_id for i in await waiter] == ["a"]
        waiter = asyncio.create_task(stream.next())
        await asyncio.sleep(0.01)
        stream.abort(["a", "b", "unknown"])
        assert await waiter == [] and not stream.open
        assert aborted == [["a", "b"]]  # one call downstream, only for requests of this stream that were open

    asyncio.run(main())


def test_abort_drops_pending_items_and_close_aborts_the_rest_once():
    async def main():
        aborted, closed = [], []
        stream = stream_of(["a", "b", "c"], aborted, closed)
        stream.put([output("a", [1]), output("b", [2])])
        stream.abort(["a"])
        assert [i.request_id for i in await stream.next()] == ["b"]  # a's item came after it was stopped
        stream.abort(["a"])  # twice: told downstream once
        stream.close()
        stream.close()
        assert aborted == [["a"], ["b", "c"]] or aborted == [["a"], ["c", "b"]]
        assert closed == [True]  # the slot (or whatever on_close frees) is given back once

    asyncio.run(main())
