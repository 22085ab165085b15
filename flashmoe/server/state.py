"""What every route of one app shares: the model, its worker, the request reader and the limits."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

from flashmoe.chat import ChatModel
from flashmoe.server.http import RequestReader
from flashmoe.server.worker import ModelWorker


@dataclass
class ServerState:
    model: ChatModel
    worker: ModelWorker
    reader: RequestReader
    max_messages: int
    created: int  # the model file's modification time (the model card's "created")

    @classmethod
    def make(cls, engine_or_llama, *, api_key: Optional[str], model_name: Optional[str], max_body_bytes: int,
             max_messages: int) -> "ServerState":
        model = ChatModel(engine_or_llama, name=model_name)
        engine = model.engine
        path = engine.model_path if engine is not None else getattr(model.llama, "model_path", "")
        try:
            created = int(os.path.getmtime(path))
        except OSError:
            created = int(time.time())
        return cls(model=model, worker=ModelWorker(model), reader=RequestReader(api_key, max_body_bytes),
                   max_messages=max_messages, created=created)

    @property
    def engine(self):
        return self.model.engine

    def model_card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "flashmoe"}
