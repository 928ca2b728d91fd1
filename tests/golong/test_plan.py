"""golong.plan: shapes, FLOPs, the CLI, and the memory prediction checked against measured training steps.

The validation runs a real training step (golong model forward + backward through the fused logprob
head, gradient clipping, AdamW step) under FSDP2 / ring attention from golong.parallel on gloo
ranks, measures each rank's peak of allocated bytes exactly (every CPU allocation and free reported
by torch.profiler(profile_memory=True), as a running sum, on top of the parameters and optimizer
states live when the step starts), and compares it with golong.plan's CPU-mode prediction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from golong.config import ConfigError, load_config
from golong.plan import ACTS, KNOWN_MODELS, OPTIM, PARAMS, REFERENCE, model_shape, predict
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------
# shapes, FLOPs, CLI
# ------------------------------------------------------------------------------------------------


def test_known_qwen3_shapes_match_published_parameter_counts():
    cfg = load_config(ROOT / "configs/qwen3-4b-grpo.yaml")  # checkpoints/Qwen3-4B-Thinking-2507: not on disk
    s = model_shape(cfg.model)
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab, s.tied) == \
        (2560, 36, 32, 8, 128, 9728, 151936, True)
    assert 4.0e9 < s.total_params < 4.05e9  # Qwen3-4B: 4.0 B
    cfg = load_config(ROOT / "configs/qwen3-30b-a3b-grpo.yaml")
    s = model_shape(cfg.model)
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.experts, s.top_k, s.moe_intermediate, s.tied) == \
        (2048, 48, 32, 4, 128, 8, 768, False)
    assert 30.0e9 < s.total_params < 31.0e9  # Qwen3-30B-A3B: 30.5 B total
    assert 3.2e9 < s.active_params + s.vocab * s.hidden < 3.5e9  # 3.3 B active (embeddings counted as published)


def test_config_json_wins_over_the_name(tmp_path):
    d = tmp_path / "Qwen3-4B-Thinking-2507"
    d.mkdir()
    raw = dict(KNOWN_MODELS["qwen3-4b"], num_hidden_layers=3)
    (d / "config.json").write_text(json.dumps(raw))
    cfg = load_config(None, [f"model.path={d}"])
    s = model_shape(cfg.model)
    assert s.layers == 3 and str(d) in s.source
    cfg = load_config(None, [f"model.path={tmp_path / 'llama-7b'}"])
    with pytest.raises(ValueError, match="matches none of the known models"):
        model_shape(cfg.model)
    for text, kind in (("[1, 2]", "list"), ('"x"', "str")):  # JSON, not an object: a traceback, or a path read
        (d / "config.json").write_text(text)
        with pytest.raises(ConfigError, match=f"a model config is a JSON object, this file holds a {kind}"):
            model_shape(load_config(None, [f"model.path={d}"]).model)


def test_flops_follow_the_documented_formula():
    cfg = load_config(ROOT / "configs/qwen3-4b-grpo.yaml", ["parallel.activation_checkpointing=false"])
    plan = predict(cfg, gpus=8, gpu_mem_gib=141)
    s, t = plan.shape, plan.throughput
    S = min(cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens, cfg.trainer.micro_batch_tokens)
    docs = cfg.trainer.prompts_per_step * cfg.rollout.n
    expect = 6 * s.active_params * docs * S + 6 * s.layers * s.heads * s.head_dim * S**2 * docs
    assert t.tokens == docs * S
    assert math.isclose(t.model_flops, expect, rel_tol=1e-12)
    # attention term = 12 L H S^2 / 2 per sequence with H = heads * head_dim
    attn = 12 * s.layers * s.heads * s.head_dim * S**2 / 2 * docs
    assert math.isclose(t.model_flops - 6 * s.active_params * t.tokens, attn, rel_tol=1e-12)
    assert t.update_s >= t.hardware_flops / (8 * 790e12) * (1 - 1e-12)
    # on-policy with rollout IS under context parallelism: no old-logprob forward (the trainer all-gathers the
    # update's own logprobs for the IS weights), so the FLOPs equal those without rollout IS
    none = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", ["parallel.activation_checkpointing=false",
                                                                      "algo.rollout_is=none"]), gpus=8).throughput
    assert cfg.parallel.cp > 1 and cfg.algo.rollout_is != "none"
    assert t.hardware_flops == none.hardware_flops


def test_parameter_counts_and_rollout_work_by_hand():
    """Parameter counts written out from the published architectures, and the rollout / recompute / KV terms
    of the FLOP and byte model from the module docstring's formulas (the other tests check only ranges)."""
    cfg = load_config(ROOT / "configs/qwen3-4b-grpo.yaml")
    s = model_shape(cfg.model)
    attn = 2560 * 32 * 128 * 2 + 2560 * 8 * 128 * 2  # q, o + k, v
    norms = 128 + 128 + 2560 + 2560  # q_norm, k_norm, input / post-attention norms
    mlp = 3 * 2560 * 9728
    assert s.total_params == 36 * (attn + norms + mlp) + 151936 * 2560 + 2560  # tied: one embedding, final norm
    assert s.active_params == 36 * (attn + mlp) + 151936 * 2560
    assert s.kv_bytes_per_token == 2 * 36 * 8 * 128 * 2  # K and V, bf16
    moe_cfg = load_config(ROOT / "configs/qwen3-30b-a3b-grpo.yaml")
    m = model_shape(moe_cfg.model)
    attn, norms = 2048 * 32 * 128 * 2 + 2048 * 4 * 128 * 2, 128 + 128 + 2048 + 2048
    assert m.total_params == 48 * (attn + norms + 128 * 2048 + 128 * 3 * 2048 * 768) + 2 * 151936 * 2048 + 2048
    assert m.active_params == 48 * (attn + 128 * 2048 + 8 * 3 * 2048 * 768) + 151936 * 2048

    gpus, mem = 16, 141
    t = predict(cfg, gpus=gpus, gpu_mem_gib=mem).throughput
    P = min(cfg.data.max_prompt_tokens, cfg.trainer.micro_batch_tokens)
    S = min(P + cfg.rollout.max_response_tokens, cfg.trainer.micro_batch_tokens)
    R, docs = S - P, cfg.trainer.prompts_per_step * cfg.rollout.n
    assert (t.doc_len, t.docs, t.tokens) == (S, docs, docs * S)
    # the rollout generates one round at least: trainer.gen_batch_prompts prompts (GoLongRL: 512 for 128 trained)
    prompts = cfg.trainer.gen_batch_prompts
    assert prompts == 512 and cfg.algo.dynamic_sampling
    # prefill once per prompt (its n responses share it): 2 N_active P + causal attention forward
    assert math.isclose(t.rollout_prefill_flops, prompts * (2 * s.active_params * P + 2 * 36 * 32 * 128 * P**2),
                        rel_tol=1e-12)
    # decode: every engine reads the bf16 weights once per step; every sequence reads its growing KV cache
    engines = gpus // cfg.rollout.tensor_parallel_size
    kv = prompts * cfg.rollout.n * s.kv_bytes_per_token * sum(P + i for i in range(R))
    assert math.isclose(t.rollout_decode_bytes, engines * R * s.total_params * 2 + kv, rel_tol=1e-3)
    # without dynamic sampling the trainer generates exactly the step's prompts
    plain = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", ["algo.dynamic_sampling=false"]), gpus=gpus,
                    gpu_mem_gib=mem).throughput
    assert math.isclose(plain.rollout_prefill_flops * prompts, t.rollout_prefill_flops * cfg.trainer.prompts_per_step,
                        rel_tol=1e-12)
    # a generation batch smaller than the step: the trainer generates rounds until the step is full, so 32 prompts
    # a round for 128 a step is 4 rounds at least (was counted as one: a quarter of the rollout); fewer than
    # algo.max_num_gen_batches allows (32 x 2 < 128) the config refuses: a step could never fill
    for extra, rounds in ((["trainer.gen_batch_prompts=32"], 4), (["trainer.gen_batch_prompts=48"], 3),
                          (["trainer.gen_batch_prompts=32", "algo.max_num_gen_batches=4"], 4)):
        small = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", extra), gpus=gpus, gpu_mem_gib=mem).throughput
        per_gen = int(extra[0].split("=")[1])
        assert math.isclose(small.rollout_prefill_flops * cfg.trainer.prompts_per_step,
                            plain.rollout_prefill_flops * rounds * per_gen, rel_tol=1e-12), extra
    reserve = cfg.rollout.gpu_memory_utilization * mem * 1024**3 * cfg.rollout.tensor_parallel_size - 2 * s.total_params
    assert math.isclose(t.kv_seqs_per_engine, reserve / (s.kv_bytes_per_token * S), rel_tol=1e-12)
    # a prompt's n responses share its KV blocks: the prompt once, each response's own tokens
    assert math.isclose(t.kv_prompts_per_engine, reserve / (s.kv_bytes_per_token * (P + cfg.rollout.n * R)),
                        rel_tol=1e-12)
    # activation checkpointing recomputes the decoder forward: 2 N_layers T + the attention forward; keeping the
    # attention (the config's parallel.ac_keep_attention), the forward without the attention, and q, k, v again
    off = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", ["parallel.activation_checkpointing=false"]),
                  gpus=gpus).throughput
    full = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", ["parallel.ac_keep_attention=false"]),
                   gpus=gpus).throughput
    assert cfg.parallel.activation_checkpointing and cfg.parallel.ac_keep_attention
    assert off.model_flops == t.model_flops == full.model_flops
    attention = 2 * 36 * 32 * 128 * S**2 * docs
    layer_fwd = 2 * (s.active_params - 151936 * 2560) * t.tokens + attention
    assert math.isclose(full.hardware_flops - off.hardware_flops, layer_fwd, rel_tol=1e-9)
    qkv = 2 * 36 * 2560 * (32 + 2 * 8) * 128 * t.tokens
    assert math.isclose(t.hardware_flops - off.hardware_flops, layer_fwd - attention + qkv, rel_tol=1e-9)
    # two PPO epochs are off-policy: an old-logprob forward (+ LM head) even without rollout IS or CP
    base = ["parallel.activation_checkpointing=false", "algo.rollout_is=none", "parallel.cp=1"]
    on = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", base), gpus=gpus).throughput
    two = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", [*base, "algo.ppo_epochs=2"]), gpus=gpus).throughput
    small = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", [*base, "trainer.mini_batch_prompts=32"]),
                    gpus=gpus).throughput
    old = layer_fwd + 2 * 151936 * 2560 * t.tokens
    assert math.isclose(two.hardware_flops - on.hardware_flops, old, rel_tol=1e-9)
    assert math.isclose(small.hardware_flops - on.hardware_flops, old, rel_tol=1e-9)  # several mini-batches
    # update roofline: each GPU's micro-batches read the bf16 weights in forward, twice in backward and in the
    # recompute; AdamW reads p, g, m, v and writes p, m, v in fp32
    micro = -(-t.tokens // (gpus // cfg.parallel.cp) // cfg.trainer.micro_batch_tokens)
    assert t.micro_batches_per_gpu == micro
    nbytes = micro * 4 * s.total_params * 2 * gpus + 7 * 4 * s.total_params
    assert t.update_s == pytest.approx(t.hardware_flops / (gpus * 790e12), rel=1e-12)
    assert t.update_bound == "compute" and t.update_s > nbytes / (gpus * 4.3e12)
    # a tiny step is bound by those reads (one pass fewer without the recompute)
    for ckpt, passes in ((True, 4), (False, 3)):
        tiny = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", [
            "data.max_prompt_tokens=64", "rollout.max_response_tokens=64", "trainer.prompts_per_step=1", "rollout.n=1",
            "algo.adv_estimator=task_norm", "trainer.mini_batch_prompts=1",  # task_norm takes rollout.n=1
            f"parallel.activation_checkpointing={ckpt}"]), gpus=gpus).throughput
        nbytes = 1 * passes * s.total_params * 2 * gpus + 7 * 4 * s.total_params
        assert tiny.update_bound == "memory" and tiny.update_s == pytest.approx(nbytes / (gpus * 4.3e12), rel=1e-12)


def test_fsdp_traffic_is_two_gathers_and_a_reduce_scatter_per_micro_batch():
    """Each GPU receives (F-1)/F of the bf16 parameters twice per micro-batch (forward, backward) and of the fp32
    gradients once, F = all GPUs; timed at the assumed NVLink bus bandwidth within a node and a NIC's across nodes,
    and what exceeds the compute bound is what fewer, larger micro-batches would save."""
    from golong.plan import NIC_BUS_BYTES_PER_S, NVLINK_BUS_BYTES_PER_S

    short = ["data.max_prompt_tokens=8192", "rollout.max_response_tokens=8192"]
    for gpus, bus in ((8, NVLINK_BUS_BYTES_PER_S), (32, NIC_BUS_BYTES_PER_S)):
        cfg = load_config(ROOT / "configs/qwen3-30b-a3b-grpo.yaml", [*short, f"parallel.cp={min(8, gpus)}"])
        s, t = model_shape(cfg.model), predict(cfg, gpus=gpus).throughput
        want = t.micro_batches_per_gpu * (2 + 2 + 4) * s.total_params * (gpus - 1) / gpus
        assert t.fsdp_bytes == pytest.approx(want, rel=1e-12) and t.fsdp_s == pytest.approx(want / bus, rel=1e-12)
    assert t.fsdp_s > t.update_compute_s  # 30B-A3B across nodes at 16K tokens: the gathers outlast the compute
    bigger = predict(load_config(ROOT / "configs/qwen3-30b-a3b-grpo.yaml",
                                 [*short, "trainer.micro_batch_tokens=524288"]), gpus=32).throughput
    assert bigger.fsdp_s < t.fsdp_s / 2.5 and bigger.update_compute_s == pytest.approx(t.update_compute_s, rel=1e-9)


def test_a_config_fits_when_both_phases_do():
    """update: peak + CUDA runtime + a sleeping vLLM's residue; rollout: resident trainer state + vLLM's
    reservation + CUDA runtime; each <= GPU memory (module docstring)."""
    gib = 1024**3
    cfg = load_config(ROOT / "configs/qwen3-4b-grpo.yaml", ["parallel.cpu_offload=false"])
    plan = predict(cfg, gpus=8, gpu_mem_gib=141)
    assert plan.update_total_bytes == plan.memory.peak_bytes + 2 * gib + 1 * gib
    assert plan.rollout_total_bytes == plan.memory.resident_bytes + 0.6 * 141 * gib + 2 * gib
    assert plan.fits == (max(plan.update_total_bytes, plan.rollout_total_bytes) <= 141 * gib)
    # vLLM taking 95% of the GPU: the update alone would fit, the rollout phase does not
    greedy = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", ["parallel.cpu_offload=false",
                                                                        "rollout.gpu_memory_utilization=0.95"]),
                     gpus=8, gpu_mem_gib=141)
    assert greedy.update_total_bytes <= 141 * gib < greedy.rollout_total_bytes and not greedy.fits
    # the torch engine and CPU planning reserve nothing for vLLM; on CPU no CUDA runtime either
    torch_engine = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", ["parallel.cpu_offload=false",
                                                                              "rollout.engine=torch"]), gpus=8)
    assert torch_engine.update_total_bytes == torch_engine.memory.peak_bytes + 2 * gib
    assert torch_engine.rollout_total_bytes == torch_engine.memory.resident_bytes + 2 * gib
    on_cpu = predict(cfg, gpus=8, device="cpu")
    assert (on_cpu.update_total_bytes, on_cpu.rollout_total_bytes) == (on_cpu.memory.peak_bytes,
                                                                       on_cpu.memory.resident_bytes)


def test_plan_exit_code_says_whether_it_fits(capsys):
    from golong.cli import main

    cfg = str(ROOT / "configs/qwen3-30b-a3b-grpo.yaml")
    assert main(["plan", cfg, "--gpus", "32", "--gpu-mem", "141"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "activations saved for backward" in out and "update lower bound" in out
    # 8 GPUs of 16 GiB cannot even hold the sharded master weights and AdamW states of 30 B parameters
    assert main(["plan", cfg, "parallel.cp=4", "--gpus", "8", "--gpu-mem", "16"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", cfg, "--gpus", "12"]) == 2  # cp=8 does not divide 12 GPUs: a one-line error
    assert "parallel.cp=8" in capsys.readouterr().err
    for mem in ("nan", "inf", "0"):  # nan planned "nan%", inf "FITS"
        with pytest.raises(SystemExit) as e:
            main(["plan", cfg, "--gpus", "32", "--gpu-mem", mem])
        assert e.value.code == 2 and "--gpu-mem a number of GiB > 0" in capsys.readouterr().err
    # a CPU run's plan: no GPU rooflines, vLLM KV capacities or NVLink timings
    assert main(["plan", str(ROOT / "configs/demo-cpu.yaml"), "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "FSDP traffic per GPU" in out and "tokens per step" in out
    assert not any(s in out for s in ("lower bound", "KV cache", "prompts with their", "NVLink", "beyond the update"))
    assert main(["plan", cfg, "--gpus", "12"]) == 2
    assert "parallel.cp=8" in capsys.readouterr().err
    # one vLLM engine per tensor_parallel_size GPUs (was FITS; the trainer refused it only after building the model)
    tmn = str(ROOT / "configs/qwen3-4b-tmn.yaml")
    assert main(["plan", tmn, "--gpus", "8", "rollout.tensor_parallel_size=3"]) == 2
    assert capsys.readouterr().err == "golong: error: rollout.tensor_parallel_size=3 does not divide --gpus 8\n"
    assert main(["plan", tmn, "--gpus", "8", "rollout.tensor_parallel_size=3", "rollout.engine=torch"]) == 0
    assert main(["plan", tmn, "--gpus", "8", "rollout.tensor_parallel_size=4"]) == 0


def test_memory_scales_as_the_parallel_layout_says():
    base = ["parallel.cpu_offload=false", "parallel.ac_keep_attention=false"]
    cfg = load_config(ROOT / "configs/qwen3-4b-grpo.yaml", base)
    p8 = predict(cfg, gpus=8).memory.breakdown
    p16 = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", [*base, "parallel.dp_shard=4"]), gpus=16)
    # sharded master params halve when the FSDP world doubles (up to dim-0 padding)
    assert math.isclose(p16.memory.resident_bytes * 2, p8[PARAMS] + p8[OPTIM], rel_tol=1e-3)
    off = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", ["parallel.cpu_offload=true"]), gpus=8)
    assert off.memory.resident_bytes == 0
    # checkpointing keeps one [T, H] per layer plus one recomputed layer instead of every layer's
    # saved tensors (~20 [T, H]-equivalents for Qwen3-4B on GPU)
    nock = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", ["parallel.activation_checkpointing=false"]),
                   gpus=8)
    assert nock.memory.breakdown[ACTS] > 10 * predict(cfg, gpus=8).memory.breakdown[ACTS]
    # keeping the attention adds its output [T, Hq*D] (and LSE) per layer: about 36 x 4096 / 2560 more [T, H]s
    keep = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", ["parallel.cpu_offload=false"]), gpus=8).memory
    # without context parallelism SDPA (which keeps per-document views of q, k, v) holds them beside the output
    one = ["parallel.cpu_offload=false", "parallel.cp=1"]
    kernels_cp1 = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", [*one, "model.attn_backend=kernels"]),
                          gpus=8).memory
    sdpa_cp1 = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", [*one, "model.attn_backend=sdpa"]),
                       gpus=8).memory
    T1 = cfg.trainer.micro_batch_tokens
    assert sdpa_cp1.breakdown[ACTS] - kernels_cp1.breakdown[ACTS] >= 33 * T1 * (32 + 16) * 128 * 2  # per layer
    X = -(-cfg.trainer.micro_batch_tokens // cfg.parallel.cp) * 2560 * 2
    assert 33 * X * 4096 / 2560 <= keep.breakdown[ACTS] - predict(cfg, gpus=8).memory.breakdown[ACTS] <= 40 * X * 2
    # at a backward peak under checkpointing the inputs of the layers not yet reached are still saved: at
    # least (layers - 2) bf16 [T, H] tensors of T = micro_batch_tokens / cp, plus at most one recomputed layer
    ck = predict(cfg, gpus=8).memory
    assert ck.peak_phase.startswith("backward") and 34 * X <= ck.breakdown[ACTS] <= (36 + 30) * X


def test_fsdp_shards_pad_dim0_up_to_a_multiple_of_the_world():
    """FSDP2 keeps ceil(dim0 / world) rows of each parameter on every rank: a tiny model on 3 ranks, counted by hand
    (an unpadded split under-counted every tensor whose first dimension the world does not divide)."""
    from golong.plan import ModelShape, Precision, simulate_update

    s = ModelShape(name="tiny", source="test", vocab=10, hidden=4, layers=1, heads=1, kv_heads=1, head_dim=2,
                   intermediate=6, tied=True)
    # rows per rank x row length: embedding 4 x 4, final norm 2; q, k, v 1 x 4 each, o 2 x 2, q/k norms 1 each,
    # the two layer norms 2 each, gate and up 2 x 4 each, down 2 x 6
    elements = (16 + 2) + (4 + 4 + 4 + 4 + 1 + 1 + 2 + 2 + 8 + 8 + 12)
    m = simulate_update(s, Precision("cpu", 4, 4, 4), tokens=8, fsdp=3, cp=1, checkpointing=False)
    assert m.breakdown[PARAMS] == 4 * elements and m.breakdown[OPTIM] == 2 * 4 * elements
    assert m.resident_bytes == 3 * 4 * elements  # master parameters + AdamW m and v, fp32


def test_gathered_weights_and_sharded_gradients_at_the_peak_by_hand():
    """Qwen3-4B (bf16 compute, 8 GPUs) as golong.parallel.apply_fsdp shards it, in bytes written out from the
    published shapes: in forward the root unit (tied embedding, final norm) stays gathered beside the current layer
    and the previous layer's all-gather buffer (world x shard: a whole layer); the last layer is not resharded after
    forward, so its backward holds it beside the root (gathered again) and the next layer's prefetched buffer. With
    many micro-batches a step, the sharded fp32 gradients are there from the start, as large as the master shard."""
    from golong.plan import GATHERED, GRADS

    layer = 2 * (2560 * 4096 * 2 + 2560 * 1024 * 2 + 2 * 128 + 2 * 2560 + 3 * 2560 * 9728)  # q, o; k, v; norms; MLP
    root = 2 * (151936 * 2560 + 2560)
    base = ["parallel.cpu_offload=false"]
    ckpt = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", base), gpus=8).memory
    assert ckpt.peak_phase == "forward, layer 35" and ckpt.breakdown[GATHERED] == root + 2 * layer
    no_ckpt = [*base, "parallel.activation_checkpointing=false"]
    plain = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", no_ckpt), gpus=8)
    m = plain.memory
    assert m.peak_phase == "backward, layer 35" and m.breakdown[GATHERED] == root + 2 * layer
    assert plain.throughput.micro_batches_per_gpu > 1 and m.breakdown[GRADS] == m.breakdown[PARAMS]
    # one micro-batch a step: the gradients come into being as the backward's reduce-scatters run, none in forward
    one = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", base), gpus=8, micro_batches=1).memory
    assert one.peak_phase.startswith("forward") and GRADS not in one.breakdown


def test_micro_batches_per_gpu_round_up_and_each_engine_reads_the_weights_per_decode_step():
    """The trainer packs at most trainer.micro_batch_tokens a micro-batch, so a GPU's share of the step takes the
    ceiling of share / budget micro-batches; decoding, each vLLM engine (tensor_parallel_size GPUs) reads the bf16
    weights once a step, every sequence its KV cache (short sequences here, so the weights' term is not lost in the
    KV reads' as at the recipe's lengths)."""
    recipe = ROOT / "configs/qwen3-4b-grpo.yaml"
    short = ["data.max_prompt_tokens=1000", "rollout.max_response_tokens=1000", "algo.dynamic_sampling=false"]
    t = predict(load_config(recipe, short), gpus=8).throughput
    per_gpu = 128 * 16 * 2000 // 2  # dp = 8 GPUs / cp 4
    assert t.micro_batches_per_gpu == 12 and 11 * 180224 < per_gpu <= 12 * 180224
    s = model_shape(load_config(recipe).model)
    for tp, engines in ((2, 8), (4, 4)):
        d = predict(load_config(recipe, [*short, f"rollout.tensor_parallel_size={tp}"]), gpus=16).throughput
        kv = 128 * 16 * s.kv_bytes_per_token * sum(1000 + i for i in range(1000))
        # rel 1e-3: the planner integrates the growing KV cache (R^2 / 2) where this sums it step by step
        assert math.isclose(d.rollout_decode_bytes, engines * 1000 * s.total_params * 2 + kv, rel_tol=1e-3)


def test_plan_names_no_ac_keep_attention_way_out_where_the_rollout_phase_is_what_does_not_fit(capsys):
    """The hint about parallel.ac_keep_attention=false is for an update that does not fit; where the vLLM reservation
    is what does not fit, recomputing the attention would change nothing."""
    from golong.cli import main

    config = str(ROOT / "configs/qwen3-4b-grpo.yaml")
    argv = ["plan", config, "parallel.cp=1", "rollout.gpu_memory_utilization=0.99", "--gpus", "8", "--gpu-mem", "200"]
    plan = predict(load_config(config, argv[2:4]), gpus=8, gpu_mem_gib=200)
    assert plan.update_total_bytes <= 200 * 2**30 < plan.rollout_total_bytes  # only the rollout phase is over
    assert main(argv) == 1
    assert "ac_keep_attention=false (recompute" not in capsys.readouterr().out


def test_a_checkpoint_directory_named_with_underscores_matches_the_built_in_table(tmp_path):
    # e.g. a download saved as Qwen3_30B_A3B_Instruct: the table is keyed with dashes
    s = model_shape(load_config(None, [f"model.path={tmp_path / 'Qwen3_30B_A3B_Instruct'}"]).model)
    assert (s.layers, s.experts, s.top_k) == (48, 128, 8) and "qwen3-30b-a3b" in s.source


# ------------------------------------------------------------------------------------------------
# validation against measured training steps
# ------------------------------------------------------------------------------------------------


def _cpu_peak(fn) -> int:
    """Peak of live allocated bytes while fn() runs, above what was live at its start.

    The CPU allocator reports every allocation and free to the profiler when profile_memory=True;
    their running sum in time order is the live set. (Frees of blocks allocated before the profiler
    started are not reported, so fn must not free what existed before it. gloo's worker threads keep
    their copy of a collective's buffer until they run their next collective, a timing-dependent
    lifetime the planner does not model: the cases below keep those buffers small.)
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    run = peak = 0
    for _, nbytes in events:
        run += nbytes
        peak = max(peak, run)
    return peak


def _live_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def _run_config(case: dict, out_dir: str) -> None:
    """The trainer's own policy update (golong.actor.Actor: FSDP2 model from build_model, packed
    micro-batches, fused logprob head, policy loss, backward, clipping, AdamW) on this rank, for
    case["micro"] micro-batches of case["docs"] sequences; writes {peak, base} to
    out_dir/<name>-<rank>.json."""
    import torch.distributed as dist

    from golong.actor import Actor, Rollout
    from golong.build import build_model
    from golong.parallel import init_parallel

    cfg = load_config(None, case["overrides"])
    dims = init_parallel(cfg.parallel.dp_shard, cfg.parallel.cp)
    model = build_model(cfg, dims, seed=0)
    actor = Actor(model, dims, cfg)
    T, docs, V = cfg.trainer.micro_batch_tokens, case["docs"], cfg.model.scratch.vocab_size
    g = torch.Generator().manual_seed(1)  # every rank builds the same global batch
    length = T // docs
    rollouts = []
    for i in range(dims.dp_size * docs * case["micro"]):
        ids = torch.randint(0, V, (length,), generator=g).tolist()
        rollouts.append(Rollout(prompt_ids=ids[:1], response_ids=ids[1:], rollout_logprobs=None, group=i,
                                task="t", advantage=float(torch.randn((), generator=g))))
    assert cfg.trainer.mini_batch_prompts >= len(rollouts)  # one optimizer step, on-policy

    # Two updates from a fresh model, both profiled: the first creates the AdamW states, and buffers
    # an update leaves behind for the next one are allocated inside the window, so the second
    # update's running sum is the steady-state live set.
    base = _live_bytes(model.parameters())
    peak = _cpu_peak(lambda: (actor.update(rollouts), actor.update(rollouts)))
    Path(out_dir, f"{case['name']}-{dist.get_rank()}.json").write_text(json.dumps({"base": base, "peak": peak}))


def _measure_worker(rank: int, world: int, cases: list[dict], out_dir: str) -> None:
    import torch.distributed as dist

    # run_distributed has initialised the default group; init_parallel reuses it
    for case in cases:
        _run_config(case, out_dir)
        dist.barrier()


def _case(name: str, *, T: int, docs: int, dp: int = 1, cp: int = 1, ckpt: bool = False, moe: bool = False,
          vocab: int = 1024, hidden: int = 64, tied: bool = True, micro: int = 1, keep: bool = False) -> dict:
    scratch = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, intermediate_size=160, tie_word_embeddings=tied)
    if moe:
        scratch.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48)
    overrides = [f"model.scratch.{k}={v}" for k, v in scratch.items()]
    overrides += [f"parallel.dp_shard={dp}", f"parallel.cp={cp}", f"parallel.activation_checkpointing={ckpt}",
                  "parallel.param_dtype=float32", f"trainer.micro_batch_tokens={T}", "rollout.engine=torch",
                  "trainer.mini_batch_prompts=1024", "trainer.prompts_per_step=1024", "algo.rollout_is=none",
                  f"parallel.ac_keep_attention={keep}"]
    return {"name": name, "overrides": overrides, "docs": docs, "world": dp * cp, "micro": micro}


CASES = [
    _case("dense-512", T=512, docs=1),
    _case("dense-256-v8k-untied-2micro", T=256, docs=1, vocab=8192, hidden=128, tied=False, micro=2),
    _case("dense-2k-4docs", T=2048, docs=4),
    _case("dense-2k-ckpt", T=2048, docs=2, ckpt=True),
    _case("moe-1k-untied-v4k", T=1024, docs=2, moe=True, vocab=4096, tied=False),
    _case("dense-dp2-1k", T=1024, docs=2, dp=2),
    _case("dense-cp2-2k", T=2048, docs=2, cp=2),
    _case("moe-cp2-ckpt-1k", T=1024, docs=1, cp=2, ckpt=True, moe=True),
    _case("dense-cp2-keep-2k", T=2048, docs=2, cp=2, ckpt=True, keep=True),
    _case("dense-cp2-ckpt-2k", T=2048, docs=2, cp=2, ckpt=True),  # the same without keeping the attention
]


@pytest.mark.distributed
def test_predicted_peak_within_15_percent_of_measured(tmp_path):
    for world in sorted({c["world"] for c in CASES}):
        run_distributed(_measure_worker, world, [c for c in CASES if c["world"] == world], str(tmp_path))
    rows = []
    for c in CASES:
        ranks = [json.loads(Path(tmp_path, f"{c['name']}-{r}.json").read_text()) for r in range(c["world"])]
        measured = max(r["base"] + r["peak"] for r in ranks)
        cfg = load_config(None, c["overrides"])
        plan = predict(cfg, gpus=c["world"], device="cpu", num_docs=c["docs"], micro_batches=c["micro"])
        rows.append((c["name"], measured, plan.memory.peak_bytes, plan.memory.peak_phase))
    report = "\n".join(f"{n:20s} measured {m / 2**20:8.2f} MiB  predicted {p / 2**20:8.2f} MiB  "
                       f"({(p - m) / m:+.1%}, peak in {ph})" for n, m, p, ph in rows)
    print(report)
    bad = [r for r in rows if abs(r[2] - r[1]) > 0.15 * r[1]]
    assert not bad, report


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused"])
def test_trainer_adamw_and_plan_follow_optim_impl(impl):
    """The trainer builds the AdamW that optim.impl names, and the plan charges its temporaries: torch's
    default on CUDA (foreach) holds one the size of all optimizer states (an H200 Qwen3-4B step measured
    75.4 GiB; plan with foreach 74.9, with for-loop 62.8)."""
    from types import SimpleNamespace

    from bench.gpu_train_step import make_config
    from golong.actor import Actor

    gpu = make_config(36, 16384, 1, tiny=False)  # the Qwen3-4B-shaped step bench.gpu_train_step measures
    assert gpu.optim.impl == "for-loop"  # the default
    gpu.optim.impl = impl
    opt = Actor._make_optimizer(SimpleNamespace(cfg=gpu, model=torch.nn.Linear(4, 4)), 1e-3)
    assert opt.defaults["foreach"] is (impl == "foreach")
    assert bool(opt.defaults["fused"]) is (impl == "fused")
    peaks = {o: predict(gpu, gpus=1, gpu_mem_gib=139.8, optimizer=o, micro_batches=1, num_docs=1).memory.peak_bytes
             for o in ("for-loop", "foreach")}
    states = 2 * 4 * 4.02e9  # AdamW m and v in fp32 for ~4.02B parameters
    assert 0.35 * states < peaks["foreach"] - peaks["for-loop"] < 0.55 * states


def test_kernel_constants_are_read_from_the_kernel_modules(monkeypatch):
    # `import kernels.flash_attention as fa` binds the exported function, whose missing attributes the plan used
    # to swallow into hard-coded copies: a changed tile size must reach the plan
    import importlib

    from golong.plan import _kernel_constants

    fa = importlib.import_module("kernels.flash_attention")
    lp = importlib.import_module("kernels.logprob")
    monkeypatch.setattr(fa, "TORCH_BLOCK_M", fa.TORCH_BLOCK_M + 1)
    monkeypatch.setattr(lp, "DH_GROUP", lp.DH_GROUP + 1)
    k = _kernel_constants()
    assert k["attn_block_m"] == fa.TORCH_BLOCK_M and k["lp_dh_group"] == lp.DH_GROUP


def test_a_kl_term_keeps_a_reference_policy_and_runs_its_forward(capsys):
    """algo.kl_coef > 0: a bf16 copy of the weights stays resident (half the fp32 master shard), and each step
    runs one more forward: what activation checkpointing's recompute costs, plus the LM head's logits."""
    base = ["parallel.cpu_offload=false", "parallel.ac_keep_attention=false"]
    plain = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", base), gpus=8)
    kl = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml", [*base, "algo.kl_coef=0.001"]), gpus=8)
    assert REFERENCE not in plain.memory.breakdown
    assert kl.memory.breakdown[REFERENCE] * 2 == pytest.approx(plain.memory.breakdown[PARAMS], rel=1e-6)
    assert kl.memory.resident_bytes == plain.memory.resident_bytes + kl.memory.breakdown[REFERENCE]
    assert kl.memory.peak_bytes == plain.memory.peak_bytes + kl.memory.breakdown[REFERENCE]
    no_ckpt = predict(load_config(ROOT / "configs/qwen3-4b-grpo.yaml",
                                  [*base, "parallel.activation_checkpointing=false"]), gpus=8)
    s, t = plain.shape, plain.throughput
    forward = (t.hardware_flops - no_ckpt.throughput.hardware_flops) + 2 * s.vocab * s.hidden * t.tokens
    assert kl.throughput.hardware_flops - t.hardware_flops == pytest.approx(forward, rel=1e-12)
    assert kl.throughput.model_flops == t.model_flops
    from golong.cli import main

    assert main(["plan", str(ROOT / "configs/qwen3-4b-grpo.yaml"), *base, "algo.kl_coef=0.001", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "reference policy (algo.kl_coef), sharded compute copy" in out and "(params + AdamW + reference)" in out


def test_plan_says_what_turning_off_ac_keep_attention_saves_where_the_update_does_not_fit(capsys):
    """The update phase over the GPU with parallel.ac_keep_attention on: the plan names the way out and its cost;
    `golong plan` also prints the config's warnings (SDPA keeping q, k, v without context parallelism)."""
    from golong.cli import main

    config = str(ROOT / "configs/qwen3-4b-grpo.yaml")
    assert main(["plan", config, "parallel.cp=1", "--gpus", "8", "--gpu-mem", "100"]) == 1
    out = capsys.readouterr().out
    plain = predict(load_config(config, ["parallel.cp=1", "parallel.ac_keep_attention=false"]), gpus=8,
                    gpu_mem_gib=100)
    hint = (f"parallel.ac_keep_attention=false (recompute the attention too) plans the update at "
            f"{plain.update_total_bytes / 2**30:,.1f} GiB per GPU, for 90.35 EFLOP instead of 71.15")
    assert plain.fits and hint in out
    assert main(["plan", config, "parallel.cp=1", "--gpus", "8", "--gpu-mem", "200"]) == 0
    assert "ac_keep_attention=false (recompute" not in capsys.readouterr().out  # it fits: nothing to say
    assert main(["plan", config, "parallel.cp=1", "model.attn_backend=sdpa", "--gpus", "8", "--gpu-mem", "300"]) == 0
    assert "SDPA keeps per-document views of q, k, v" in capsys.readouterr().err


def test_plan_notes_how_many_responses_share_a_full_length_prompt():
    """The figures count whole sequences; with trainer.share_prompts the note says how many of a full-length
    prompt's responses pack beside one copy of it: 1 for the recipe's 160K + 16K in a 176K budget, all 16 where
    the budget holds them, no note without sharing."""
    recipe = ROOT / "configs/qwen3-4b-grpo.yaml"

    def note(*overrides):
        plan = predict(load_config(recipe, list(overrides)), gpus=8, gpu_mem_gib=141)
        return [n for n in plan.notes if n.startswith("figures count whole sequences")]

    assert note() == ["figures count whole sequences: with trainer.share_prompts a full-length prompt's 16 "
                      "responses pack one per micro-batch, each a whole sequence; shorter prompts share theirs "
                      "among more"]
    # 64K prompt + 16 x (4K + 1) rows = 131,087 <= 180,224: all 16; 5 of them in 65,535 + 5 x 4,097 rows
    assert "pack 16 per micro-batch" in note("data.max_prompt_tokens=65536", "rollout.max_response_tokens=4096")[0]
    assert "pack 5 per micro-batch" in note("data.max_prompt_tokens=65536", "rollout.max_response_tokens=4096",
                                            "trainer.micro_batch_tokens=86020")[0]
    assert "pack 4 per micro-batch" in note("data.max_prompt_tokens=65536", "rollout.max_response_tokens=4096",
                                            "trainer.micro_batch_tokens=86019")[0]  # one row short of the fifth
    assert note("trainer.share_prompts=false") == []


def test_plan_sizes_the_routing_replay_records_a_rank_holds():
    """rollout.router_replay on Qwen3-30B-A3B (48 layers x top-8, 128 experts: one byte an entry, 384 a token): a
    rank's share of a generation batch's records, then its dp group's share of the step's; no note without it or
    for a dense model."""
    recipe = ROOT / "configs/qwen3-30b-a3b-grpo.yaml"

    def note(path=recipe, *overrides):
        # vLLM tensor parallelism cannot record the routing: the replay runs at tensor_parallel_size 1
        plan = predict(load_config(path, ["rollout.router_replay=true", "rollout.tensor_parallel_size=1", *overrides]),
                       gpus=32, gpu_mem_gib=141)
        return [n for n in plan.notes if n.startswith("rollout.router_replay")]

    tokens = 163_840 + 16 * 16_384  # the longest prompt once, its 16 responses
    generated, trained = 512 * tokens * 384 / 32, 128 * tokens * 384 / (32 // 8)  # 32 ranks; dp 4 (cp 8)
    assert note() == [f"rollout.router_replay: each rank keeps the routing records of the responses it generated (up "
                      f"to {generated / 2**30:,.1f} GiB of host memory for a generation batch) and receives its dp "
                      f"group's share of the step's ({trained / 2**30:,.1f} GiB); 384 bytes a token"]
    assert note(recipe, "rollout.router_replay=false") == []
    assert note(ROOT / "configs/qwen3-4b-grpo.yaml") == []


def test_a_budget_below_the_longest_sequence_is_said():
    """The figures cap a sequence at trainer.micro_batch_tokens, while the trainer runs a longer one as a micro-batch
    of its own: a smaller budget made the plan say FITS for a run that would not fit, without a word."""
    recipe = ROOT / "configs/qwen3-4b-grpo.yaml"

    def warnings(*overrides: str) -> list[str]:
        plan = predict(load_config(recipe, list(overrides)), gpus=8, gpu_mem_gib=141)
        return [n for n in plan.notes if n.startswith("WARNING: sequences of up to")]

    assert warnings() == []  # the recipe's budget holds its longest sequence (163,840 + 16,384)
    (said,) = warnings("trainer.micro_batch_tokens=32768")
    assert "180,224 tokens" in said and "trainer.micro_batch_tokens=32,768" in said and \
        said.endswith("plan the worst case with trainer.micro_batch_tokens=180224")
