"""Serving benchmark on the embedded engine: cold start, tokens/s at 1 and 8 concurrent requests, and the
client-side overhead per call of ServingLLM and of ChatServing against raw HTTP to the same server (target: under
2 ms each).

Prints a markdown table. Ratios and differences are taken within this one run.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import httpx

from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer
from langchain_energy.chat_models import ChatServing
from langchain_energy.llms import ServingLLM

PROMPT = "Explain in detail how a wind turbine turns wind into electricity, step by step. " * 4
OUTPUT_TOKENS = 64
OVERHEAD_CALLS = 40


async def throughput(llm: ServingLLM, concurrency: int, rounds: int) -> float:
    """Generated tokens per second with `concurrency` requests in flight."""
    started = time.perf_counter()
    tokens = 0
    for _ in range(rounds):
        results = await asyncio.gather(*(llm.agenerate([PROMPT]) for _ in range(concurrency)))
        tokens += sum(r.llm_output["token_usage"]["completion_tokens"] for r in results)
    return tokens / (time.perf_counter() - started)


async def raw_call(client: httpx.AsyncClient, url: str, body: dict) -> None:
    async with client.stream("POST", url, json=body) as response:
        async for _ in response.aiter_lines():
            pass


async def overhead(models: dict[str, ServingLLM | ChatServing],
                   server: VLLMServer) -> dict[str, tuple[float, float]]:
    """Median wall seconds and mean client CPU seconds per 1-token call, for each model and for ``raw`` HTTP.

    Every model sends the same request body as the raw path (one user message "Hi"), so only the client differs.
    """
    first = next(iter(models.values()))
    body = first.get_backend().request_body("Hi", first._sampling(max_tokens=1))
    url = server.base_url + "/chat/completions"
    names = [*models, "raw"]
    walls: dict[str, list[float]] = {name: [] for name in names}
    cpu = dict.fromkeys(names, 0.0)
    async with httpx.AsyncClient(timeout=60) as client:
        await raw_call(client, url, body)
        for model in models.values():
            await model.ainvoke("Hi", max_tokens=1)
        order = random.Random(0)
        for _ in range(OVERHEAD_CALLS):
            # Interleaved in a shuffled order: the engine's step phase favours whichever call comes later.
            for name in order.sample(names, len(names)):
                c0, t0 = time.process_time(), time.perf_counter()
                if name == "raw":
                    await raw_call(client, url, body)
                else:
                    await models[name].ainvoke("Hi", max_tokens=1)
                walls[name].append(time.perf_counter() - t0)
                cpu[name] += time.process_time() - c0
    return {name: (statistics.median(walls[name]), cpu[name] / OVERHEAD_CALLS) for name in names}


def main() -> None:
    server = VLLMServer(EngineConfig(max_num_seqs=8, max_model_len=4096))
    started = time.perf_counter()
    with server:
        cold_start = time.perf_counter() - started
        llm = ServingLLM.from_server(server, max_tokens=OUTPUT_TOKENS, ignore_eos=True, seed=0)
        chat = ChatServing.from_server(server, max_tokens=OUTPUT_TOKENS, ignore_eos=True, seed=0)
        tps1 = asyncio.run(throughput(llm, 1, 3))
        tps8 = asyncio.run(throughput(llm, 8, 2))
        per_call = asyncio.run(overhead({"ServingLLM": llm, "ChatServing": chat}, server))
    print("| metric | value | target |")
    print("| --- | --- | --- |")
    print(f"| engine cold start (SmolLM2-135M, vLLM CPU, enforce-eager) | {cold_start:.1f} s | |")
    print(f"| tokens/s, 1 request in flight ({OUTPUT_TOKENS} output tokens) | {tps1:.1f} | |")
    print(f"| tokens/s, 8 requests in flight | {tps8:.1f} | |")
    print(f"| batching gain (8 vs 1) | {tps8 / tps1:.2f}x | |")
    raw_wall, raw_cpu = per_call["raw"]
    for name in ("ServingLLM", "ChatServing"):
        wall, cpu = per_call[name]
        print(f"| {name} client CPU per call minus raw HTTP | {(cpu - raw_cpu) * 1e3:.2f} ms | < 2 ms |")
        print(f"| median wall per 1-token call: {name} / raw HTTP | {wall * 1e3:.1f} / {raw_wall * 1e3:.1f} ms"
              f" (diff {(wall - raw_wall) * 1e3:+.2f} ms) | < 2 ms |")


if __name__ == "__main__":
    main()
