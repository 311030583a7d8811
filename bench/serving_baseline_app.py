"""The minimal FastAPI + numpy retrieval app that bench/serving_server.py measures the servers
against: what anyone would write in an afternoon, holding the same vectors in memory.

    python -m bench.serving_baseline_app --port 5003 --data <dir with users.parquet, seen.parquet, items.npz>

``POST /invocations`` with ``{"dataframe_records": [{"user_id": ..., "k": ...}]}``: each known
user's top k unseen items by a float32 matrix-vector product, no checks, no fallbacks.
"""

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def make_app(data: Path) -> FastAPI:
    users = pq.read_table(data / "user_vectors.parquet")
    user_row = {u: i for i, u in enumerate(users.column("user_id").to_pylist())}
    dim = users.schema.field("embedding").type.list_size
    user_vectors = users.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    items = np.load(data / "items.npz")
    item_ids, item_vectors = items["item_ids"], items["vectors"]
    item_row = {x: i for i, x in enumerate(item_ids.tolist())}
    seen: dict[str, list[int]] = {}
    pairs = pq.read_table(data / "seen_pairs.parquet").to_pydict()
    for user, item in zip(pairs["user_id"], pairs["item_id"]):
        seen.setdefault(user, []).append(item_row[item])
    app = FastAPI()

    @app.get("/ping")
    async def ping():
        return {"ok": True}

    @app.post("/invocations")
    async def invocations(request: Request):
        predictions = []
        for record in (await request.json())["dataframe_records"]:
            k, user = int(record["k"]), record["user_id"]
            scores = item_vectors @ user_vectors[user_row[user]]
            scores[seen.get(user, [])] = -np.inf
            top = np.argpartition(scores, len(scores) - k)[-k:]
            top = top[np.argsort(-scores[top])]
            predictions.append({"item_ids": item_ids[top].tolist(), "scores": scores[top].tolist(), "source": "user"})
        return JSONResponse({"predictions": predictions})

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    uvicorn.run(make_app(args.data), host="127.0.0.1", port=args.port, log_level="warning")
