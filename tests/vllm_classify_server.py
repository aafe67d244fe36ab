"""A stand-in for vLLM's classification API, for worker_openai's --reward-api classify: vLLM cannot run here
(no CUDA), so this serves the same HTTP contract over a real Hugging Face reward model on the CPU.

    python -m tests.vllm_classify_server --port P --model DIR --served-model-name NAME

It mirrors vLLM's entrypoints/pooling/classify: POST /classify with {"model", "input": str | [str],
"add_special_tokens": bool (default true)} answers {"id", "object": "list", "created", "model", "data": [{"index",
"label", "probs", "num_classes"}], "usage": {"prompt_tokens", "total_tokens", "completion_tokens": 0}}; the
activation is vLLM's PoolerClassify for a classification model (sigmoid when the model has one label, softmax
over the labels otherwise; identity for problem_type "regression"). GET /health and /v1/models as vLLM has them.
"""

from __future__ import annotations

import argparse
import time
import uuid

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = tokenizer = None
served_name = ""


def activation(logits: torch.Tensor) -> torch.Tensor:
    if getattr(model.config, "problem_type", "") == "regression":
        return logits
    return torch.sigmoid(logits) if logits.shape[-1] < 2 else torch.softmax(logits, dim=-1)


async def classify(request: Request) -> Response:
    body = await request.json()
    if body.get("model") not in (None, served_name):
        return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                       "type": "NotFoundError", "code": 404}}, status_code=404)
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    special = body.get("add_special_tokens", True)
    data, prompt_tokens = [], 0
    with torch.inference_mode():
        for i, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=special, return_tensors="pt")["input_ids"]
            prompt_tokens += ids.shape[-1]
            probs = activation(model(input_ids=ids).logits.float()[0])
            label = model.config.id2label.get(int(probs.argmax()), str(int(probs.argmax())))
            data.append({"index": i, "label": label, "probs": [float(p) for p in probs],
                         "num_classes": int(probs.shape[-1])})
    return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                         "model": served_name, "data": data,
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                                   "completion_tokens": 0, "prompt_tokens_details": None}})


async def health(request: Request) -> Response:
    return Response(status_code=200)


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "vllm"}]})


def main() -> None:
    global model, tokenizer, served_name
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    served_name = args.served_model_name
    app = Starlette(routes=[Route("/classify", classify, methods=["POST"]),
                            Route("/health", health), Route("/v1/models", models)])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
