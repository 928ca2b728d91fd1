"""Drive a VLLMEngine through a scripted rollout / weight-update sequence; run with the vLLM venv's python.

    .venv-vllm/bin/python -m golong.rollout._vllm_worker SPEC.json OUT.json

tests/golong/test_vllm_sync.py uses it: vLLM needs its own venv, so the engine cannot live in the
pytest process. SPEC (JSON):
    model, dtype, max_model_len, bucket_bytes, eos_token_ids, prompts [[int]], seeds [int],
    phases: [{"update": null | "file.safetensors", "sampling": {temperature, top_p, top_k, max_tokens}}],
    stop_probe: bool, partial_update: {"file", "drop": [names], "sampling"} (optional),
    gpu_sleep_probe: {"file", "sampling"} (optional, last)
Each phase first pushes its update (if any) with `VLLMEngine.update_weights` — the tensors are read
from the file into memory here only because the test's trainer lives in another venv; the push itself
is in memory — then generates one response per prompt. OUT (JSON): per phase token_ids, logprobs,
finish_reasons, the update's stats and timings; with stop_probe, greedy responses and one of them
rerun with a stop token taken from it; with partial_update, the errors of the incomplete push and of
a generate after it, then a complete push of the same file and one more generate ("recovered"); with
gpu_sleep_probe, the engine's GPU sleep / wake branch (is_cpu forced off) through vLLM's real LLM -> engine
core -> executor path, only the worker's CuMem calls replaced by recorders: a generate, a level-2 sleep, a push
of `file`, a generate again (the worker calls, both results); then a sleep and a generate without a push (its
error).
"""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    t0 = time.perf_counter()
    with open(spec_path) as f:
        spec = json.load(f)
    from safetensors.torch import load_file

    from golong.rollout.torch_generator import SamplingParams
    from golong.rollout.vllm_engine import VLLMConfig, VLLMEngine

    cfg = VLLMConfig(model=spec["model"], dtype=spec.get("dtype", "float32"),
                     max_model_len=spec.get("max_model_len", 512), max_num_seqs=spec.get("max_num_seqs", 16),
                     bucket_bytes=spec.get("bucket_bytes", 512 << 20), seed=spec.get("seed", 0))
    engine = VLLMEngine(cfg, eos_token_ids=spec.get("eos_token_ids", []))
    out: dict = {"init_seconds": time.perf_counter() - t0, "phases": []}
    prompts, seeds = spec["prompts"], spec.get("seeds")
    for phase in spec["phases"]:
        rec: dict = {}
        if phase.get("update"):
            state = load_file(phase["update"])  # stands in for the trainer's parameters
            rec["update"] = engine.update_weights(state.items())
            del state
        params = SamplingParams(**phase.get("sampling", {}))
        t = time.perf_counter()
        reports: list[int] = []  # progress callback calls, as the trainer's progress bar receives them
        res = engine.generate(prompts, params, seeds=seeds, progress=reports.append)
        rec.update(token_ids=res.token_ids, logprobs=res.logprobs, finish_reasons=res.finish_reasons,
                   generate_seconds=time.perf_counter() - t, progress=reports)
        out["phases"].append(rec)
    if spec.get("stop_probe"):
        # greedy on every prompt; then one prompt again, told to stop at a token that first appears
        # at position >= 2 of its greedy response (or at its first token when no response has one)
        greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
        firsts = [(i, k) for i, ids in enumerate(greedy.token_ids) for k in range(2, len(ids))
                  if ids[k] not in ids[:k]]
        i, k = firsts[0] if firsts else (0, 0)
        ids = greedy.token_ids[i]
        s = engine.generate([prompts[i]], SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[ids[k]]))
        reports = []
        empty = engine.generate([], SamplingParams(max_tokens=4), seeds=[], progress=reports.append)  # a rank's share
        out["stop_probe"] = {"greedy": greedy.token_ids, "greedy_logprobs": greedy.logprobs, "prompt": i,
                             "stop_at": k, "stopped": s.token_ids[0], "stopped_reason": s.finish_reasons[0],
                             "empty": [len(empty), len(empty.logprobs), reports]}
    if spec.get("partial_update"):
        # a push that misses some tensors must fail loudly, naming the engine parameters left stale;
        # the engine then refuses to sample until a complete push, after which it is whole again
        part = spec["partial_update"]
        state = load_file(part["file"])
        full = dict(state)
        for name in part["drop"]:
            del state[name]
        out["partial_update_error"] = _error(lambda: engine.update_weights(state.items()))
        params = SamplingParams(**part.get("sampling", {}))
        out["generate_after_partial_error"] = _error(lambda: engine.generate(prompts, params, seeds=seeds))
        engine.update_weights(full.items())
        res = engine.generate(prompts, params, seeds=seeds)
        out["recovered"] = {"token_ids": res.token_ids, "logprobs": res.logprobs}
    if spec.get("gpu_sleep_probe"):
        out["gpu_sleep_probe"] = _gpu_sleep_probe(engine, spec["gpu_sleep_probe"], prompts, seeds)
    out["total_seconds"] = time.perf_counter() - t0
    with open(out_path, "w") as f:
        json.dump(out, f)


def _gpu_sleep_probe(engine, probe: dict, prompts: list, seeds: list | None) -> dict:
    from safetensors.torch import load_file
    from vllm.v1.worker.cpu_worker import CPUWorker

    from golong.rollout.torch_generator import SamplingParams

    calls: list = []
    CPUWorker.sleep = lambda self, level=1: calls.append(["sleep", level])
    CPUWorker.wake_up = lambda self, tags=None: calls.append(["wake_up", sorted(tags or [])])
    engine.is_cpu = False  # sleep() takes its GPU branch; a CPU worker's own sleep would be a no-op anyway
    params = SamplingParams(**probe.get("sampling", {}))
    before = engine.generate(prompts, params, seeds=seeds)
    engine.sleep()  # the trainer's turn
    rec: dict = {"asleep": engine.asleep}
    engine.update_weights(load_file(probe["file"]).items())
    after = engine.generate(prompts, params, seeds=seeds)
    rec.update(calls=list(calls), asleep_after=engine.asleep, sleep_level=engine.config.sleep_level,
               before={"token_ids": before.token_ids, "logprobs": before.logprobs},
               after={"token_ids": after.token_ids, "logprobs": after.logprobs})
    engine.sleep()  # then a generate with no push in between: the discarded weights must not be sampled
    rec["generate_asleep_error"] = _error(lambda: engine.generate(prompts, params, seeds=seeds))
    rec["asleep_after_refusal"] = engine.asleep
    engine.update_weights(load_file(probe["file"]).items())
    engine.is_cpu = True
    return rec


def _error(fn) -> str | None:
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return None


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
