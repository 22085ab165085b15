"""The model's one worker thread (all model work, in arrival order), the preparation thread beside it,
and running a job there as a plain answer or as a stream of server-sent events."""
from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from flashmoe.chat import ChatModel, RequestError
from flashmoe.server.http import APIError, from_request_error

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ModelWorker:
    """One thread that runs all model work, in arrival order."""

    def __init__(self, model: ChatModel):
        self.model = model
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashmoe-model")
        # request preparation (schema checks, template, tokenization) runs beside the model thread: a
        # large or hostile request is refused without making the others wait behind it
        self.prep_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashmoe-prep")
        self.closing = threading.Event()
        self.waiting = 0  # requests queued or running
        self.served = 0
        self.failed = 0

    async def run(self, fn: Callable, *args):
        loop = asyncio.get_running_loop()
        self.waiting += 1
        try:
            return await loop.run_in_executor(self.pool, fn, *args)
        finally:
            self.waiting -= 1

    def close(self):
        self.closing.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.prep_pool.shutdown(wait=False, cancel_futures=True)

    async def prep(self, fn: Callable, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prep_pool, fn, *args)


def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


async def guarded(worker: ModelWorker, fn: Callable, prep: bool = False):
    """Run ``fn`` on the model thread (``prep``: on the preparation thread); request errors become 400s,
    anything else a 500."""
    try:
        return await (worker.prep(fn) if prep else worker.run(fn))
    except RequestError as e:
        raise from_request_error(e)
    except APIError:
        raise
    except Exception as e:
        worker.failed += 1
        raise APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


async def run_streaming(worker: ModelWorker, job: Callable):
    """Run ``job(emit, cancelled)`` on the model thread; yield ("content", text) as it emits, then
    ("done", result) or ("error", APIError). When the client goes away, the job is told to stop."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def emit(item):
        loop.call_soon_threadsafe(q.put_nowait, item)

    def cancelled() -> bool:
        return cancel.is_set() or worker.closing.is_set()

    def body():
        if cancelled():
            emit(("error", APIError(503, "the request was cancelled before it ran", type="server_error")))
            return None
        try:
            emit(("done", job(emit, cancelled)))
        except RequestError as e:
            emit(("error", from_request_error(e)))
        except Exception as e:
            worker.failed += 1
            emit(("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")))

    fut = asyncio.ensure_future(worker.run(body))
    fut.add_done_callback(lambda f: q.put_nowait(("error", APIError(503, "the server is shutting down",
                                                                    type="server_error")))
                          if f.cancelled() else None)
    try:
        while True:
            item = await q.get()
            yield item
            if item[0] != "content":
                if item[0] == "done":
                    worker.served += 1
                break
    finally:
        cancel.set()
        if not fut.done():
            fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
