"""The plain-torch rollout generator: sampling rule, KV-cache decoding vs full forward, seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from golong.models import from_config
from golong.rollout import GenerationResult, SamplingParams, TorchGenerator, sample_tokens
from tests.golong.model_fixtures import sampling_probs
from tests.golong.trainer_helpers import one_thread  # noqa: F401  (autouse fixture)

VOCAB = 203  # odd, not a multiple of anything


def tiny_moe(seed: int = 0):
    cfg = dict(model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=40, norm_topk_prob=True, tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # O(1) logits so sampling is far from uniform (HF's 0.02 init is near-uniform)
        for n, p in model.named_parameters():
            if not n.endswith("norm.weight"):
                p.normal_(0, 1.0 if "embed" in n else p.shape[-1] ** -0.5)
    return model.eval()


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.6, top_p=0.95),
                                    SamplingParams(temperature=1.3, top_k=7), SamplingParams(temperature=0.8,
                                                                                             top_p=0.5, top_k=20),
                                    SamplingParams(temperature=0.7, top_p=0.0)],
                         ids=["plain", "val", "topk", "topk_topp", "topp0"])
def test_sample_tokens_follows_truncated_distribution(params):
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB) * 3
    n = 20000
    # a uniform grid makes inverse-CDF sampling exact: each token's frequency = its mass +- 1/n
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    want = sampling_probs(logits, params)
    for b in range(3):
        toks, logp = sample_tokens(logits[b:b + 1].expand(n, -1), u, params)
        freq = torch.bincount(toks, minlength=VOCAB).double() / n
        assert (freq[want[b] == 0] == 0).all(), "sampled a token outside top-k / top-p"
        assert (freq - want[b]).abs().max() < 2.0 / n + 1e-6
        # the logprob of the distribution sampled from, as vLLM's processed_logprobs gives it
        ref = want[b].log()[toks]
        assert (logp.double() - ref).abs().max() < 1e-5


def test_top_p_keeps_the_tokens_whose_mass_before_them_is_below_it():
    """Hand-computed boundaries (probabilities 1/2, 1/4, 1/4, exact in binary): as vLLM does, a token is kept while
    the mass strictly before it is below top_p: top_p 0.5 keeps the first token alone (the mass before the second
    is exactly 0.5), 0.75 the first two, 0.76 all three; whatever the uniform, only kept tokens are drawn."""
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]]).expand(999, 3)
    u = (torch.arange(999, dtype=torch.float64) + 0.5) / 999
    for top_p, kept in ((0.5, {0}), (0.75, {0, 1}), (0.76, {0, 1, 2}), (0.2, {0})):
        toks, logp = sample_tokens(logits, u, SamplingParams(temperature=1.0, top_p=top_p))
        assert set(toks.tolist()) == kept, top_p
        mass = {0: 0.5, 1: 0.25, 2: 0.25}
        want = torch.tensor([math.log(mass[t] / sum(mass[k] for k in kept)) for t in toks.tolist()])
        assert torch.allclose(logp.double(), want.double(), atol=1e-6), top_p


def test_top_k_zero_is_off_as_in_vllm():
    """top_k 0 samples the whole distribution, as -1 does: vLLM's "off" is 0 (the engine passes max(top_k, 0)) and
    rollout.top_k takes either; keeping the top 0 tokens would leave only the forced first one (greedy)."""
    torch.manual_seed(2)
    logits = torch.randn(4, VOCAB) * 3
    u = torch.rand(4, generator=torch.Generator().manual_seed(1))
    for top_p in (1.0, 0.9):
        off = sample_tokens(logits, u, SamplingParams(temperature=1.0, top_p=top_p, top_k=-1))
        zero = sample_tokens(logits, u, SamplingParams(temperature=1.0, top_p=top_p, top_k=0))
        assert torch.equal(off[0], zero[0]) and torch.equal(off[1], zero[1]), top_p
    # the uniforms reach past the first token's mass: top-0-as-greedy would draw argmax alone
    assert not torch.equal(off[0], logits.argmax(-1))


def test_a_uniform_rounding_to_one_still_draws_a_kept_token():
    """A uniform just below 1 (a float64 one rounds to 1.0 in the cdf's fp32) lands on the top of the cdf: the draw is
    the last kept token, never the first truncated (zero-mass) slot after it."""
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]]).expand(2, 3)
    u = torch.tensor([1 - 1e-12, 1 - 1e-9], dtype=torch.float64)
    for params, last_kept in ((SamplingParams(temperature=1.0, top_p=0.5), 0),
                              (SamplingParams(temperature=1.0, top_p=0.75), 1),
                              (SamplingParams(temperature=1.0, top_k=2), 1)):
        toks, logp = sample_tokens(logits, u, params)
        assert toks.tolist() == [last_kept, last_kept], params
        assert torch.isfinite(logp).all(), params


def test_greedy_is_argmax():
    logits = torch.randn(5, VOCAB)
    toks, logp = sample_tokens(logits, torch.rand(5), SamplingParams(temperature=0.0))
    assert torch.equal(toks, logits.argmax(-1))
    assert torch.allclose(logp, torch.log_softmax(logits, -1).max(-1).values)


def test_temperature_below_vllms_floor_samples_at_it():
    """vLLM raises a temperature in (0, 0.01) to 0.01 (its SamplingParams): TorchGenerator samples and reports
    logprobs at 0.01 too, so the two engines agree for one config."""
    logits = torch.randn(4, VOCAB) * 0.01  # near-ties: the temperature decides the distribution
    u = torch.rand(4, generator=torch.Generator().manual_seed(0))
    low = sample_tokens(logits, u, SamplingParams(temperature=0.002))
    floor = sample_tokens(logits, u, SamplingParams(temperature=0.01))
    assert torch.equal(low[0], floor[0]) and torch.equal(low[1], floor[1])
    ref = torch.log_softmax(logits.double() / 0.01, -1).gather(-1, floor[0][:, None])[:, 0]
    assert (floor[1].double() - ref).abs().max() < 1e-5


def _full_forward_logprobs(model, prompt: list[int], resp: list[int], params: SamplingParams) -> torch.Tensor:
    """Each response token's logprob under the distribution `params` samples from, by one full forward: the
    trainer's fused head without truncation, the fp64 oracle of the truncated distribution with it."""
    ids = torch.tensor(prompt + resp)
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    at = slice(len(prompt) - 1, len(ids) - 1)
    with torch.no_grad():
        hidden = model(ids, cu)
        if params.top_p < 1 or params.top_k > 0:
            allowed = sampling_probs(model.logits(hidden)[at], params)
            return allowed.log().gather(-1, torch.tensor(resp)[:, None])[:, 0].float()
        targets = torch.cat([ids[1:], torch.tensor([-100])])
        logp, _ = model.logprob_entropy(hidden, targets, params.temperature)
    return logp[at]


def test_generate_matches_full_forward_and_stops():
    model = tiny_moe()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 11, 1, 8, 17)]
    params = SamplingParams(temperature=0.9, top_p=0.97, max_tokens=13)
    seeds = [10, 11, 12, 13, 14]
    free = TorchGenerator(model, eos_token_ids=[], max_batch=3).generate(prompts, params, seeds=seeds)
    eos = next(t for t in free.token_ids[0][2:] if t not in free.token_ids[0][:2])  # row 0 stops early
    gen = TorchGenerator(model, eos_token_ids=[eos], max_batch=3)  # 2 chunks
    out = gen.generate(prompts, params, seeds=seeds)
    assert isinstance(out, GenerationResult) and len(out) == 5
    assert out.finish_reasons[0] == "stop" and len(out.token_ids[0]) < params.max_tokens
    for prompt, toks, lps, reason, ref_toks in zip(prompts, out.token_ids, out.logprobs, out.finish_reasons,
                                                   free.token_ids):
        assert 1 <= len(toks) == len(lps) <= params.max_tokens
        if reason == "stop":
            assert toks[-1] == eos and eos not in toks[:-1]
        else:
            assert len(toks) == params.max_tokens and eos not in toks
        # the same seeded stream as without a stop token, cut after its first eos
        assert toks == ref_toks[:ref_toks.index(eos) + 1 if eos in ref_toks else len(ref_toks)]
        ref = _full_forward_logprobs(model, prompt, toks, params)
        err = (torch.tensor(lps) - ref).norm() / ref.norm()
        assert err < 1e-5, err


def test_seeded_and_batch_independent():
    model = tiny_moe(seed=2)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 3, 14, 6)]
    params = SamplingParams(temperature=1.0, max_tokens=10)
    gen = TorchGenerator(model, eos_token_ids=[0])
    a = gen.generate(prompts, params, seeds=[5, 6, 7, 8])
    b = gen.generate(prompts, params, seeds=[5, 6, 7, 8])
    assert a.token_ids == b.token_ids
    # the same request alone (batch of one, other position) samples the same response
    solo = gen.generate([prompts[2]], params, seeds=[7])
    assert solo.token_ids[0] == a.token_ids[2]
    assert torch.allclose(torch.tensor(solo.logprobs[0]), torch.tensor(a.logprobs[2]), atol=1e-5)
    c = gen.generate(prompts, params, seeds=[50, 60, 70, 80])
    assert c.token_ids != a.token_ids


def test_stop_ids_default_seeds_progress_and_errors():
    model = tiny_moe(seed=4).train()
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (4, 9, 2, 7, 5)]
    params = SamplingParams(temperature=1.0, max_tokens=12)
    free = TorchGenerator(model, eos_token_ids=[], max_batch=2).generate(prompts, params)
    assert model.training  # generate() switches to eval and back
    # default seeds are 0..N-1: a repeated prompt gets distinct samples, equal to the explicit seeds
    assert free.token_ids == TorchGenerator(model, eos_token_ids=[]).generate(prompts, params,
                                                                                seeds=[0, 1, 2, 3, 4]).token_ids
    same = TorchGenerator(model, eos_token_ids=[]).generate([prompts[0]] * 3, params)
    assert same.token_ids[0] == free.token_ids[0] and len({tuple(t) for t in same.token_ids}) == 3
    # the engine's EOS ids and the request's stop_token_ids both end a response, each at its first hit
    a, b = free.token_ids[1][3], free.token_ids[3][5]
    stop_params = SamplingParams(temperature=1.0, max_tokens=12, stop_token_ids=[b])
    done: list[int] = []
    out = TorchGenerator(model, eos_token_ids=[a], max_batch=2).generate(prompts, stop_params, progress=done.append)
    assert done == [2, 2, 1]  # requests finished per chunk
    for ref, toks, reason in zip(free.token_ids, out.token_ids, out.finish_reasons):
        hits = [t for t, x in enumerate(ref) if x in (a, b)]
        want = ref[:hits[0] + 1] if hits else ref
        assert toks == want and reason == ("stop" if hits else "length")
    assert out.finish_reasons[1] == out.finish_reasons[3] == "stop"
    with pytest.raises(ValueError, match="2 seeds for 5 prompts"):
        TorchGenerator(model, eos_token_ids=[]).generate(prompts, params, seeds=[1, 2])
    with pytest.raises(ValueError, match="empty prompt"):
        TorchGenerator(model, eos_token_ids=[]).generate([[1, 2], []], params)


def test_greedy_generate_matches_argmax_of_full_forward():
    model = tiny_moe(seed=5)
    prompt = [3, 14, 15, 92, 65, 35]
    out = TorchGenerator(model, eos_token_ids=[]).generate([prompt], SamplingParams(temperature=0, max_tokens=6))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            h = model(torch.tensor(seq), torch.tensor([0, len(seq)], dtype=torch.int32))
            seq.append(int(model.logits(h[-1]).argmax()))
    assert out.token_ids[0] == seq[len(prompt):]
    assert not model.training  # an eval model stays in eval (generate restores the mode it found)


def test_load_weights_changes_samples():
    model, other = tiny_moe(seed=0), tiny_moe(seed=9)
    gen = TorchGenerator(model, eos_token_ids=[])
    p = SamplingParams(temperature=0, max_tokens=8)
    before = gen.generate([[1, 2, 3]], p).token_ids
    gen.load_weights((n, t.detach().clone()) for n, t in other.named_parameters())
    after = gen.generate([[1, 2, 3]], p).token_ids
    ref = TorchGenerator(other, eos_token_ids=[]).generate([[1, 2, 3]], p).token_ids
    assert after == ref and after != before
    pushed = dict(other.named_parameters())
    assert all(torch.equal(p, pushed[n]) for n, p in model.named_parameters())  # an exact copy of every tensor


def test_vllm_weight_sync_names_match_the_hf_checkpoint(tmp_path):
    """The trainer pushes (HF name, tensor) pairs into vLLM (hf_state_items on the parameters' device): exactly the
    keys and values that save_pretrained writes (per-expert layout), so vLLM's own loader maps every one of them."""
    from safetensors.torch import load_file

    from golong.models.checkpoint import hf_state_items

    model = tiny_moe(seed=3)
    pushed = dict(hf_state_items(model, device=None))
    model.save_pretrained(tmp_path)
    saved = {k: v for f in sorted(tmp_path.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(pushed) == sorted(saved) and any(".experts.3.up_proj.weight" in k for k in pushed)
    for k, v in saved.items():
        assert torch.equal(pushed[k], v), k


def _response_logprobs(model, prompt, response, routed=None):
    """The trainer's view of a sampled response: its tokens' logprobs under `model` (T = 1), one packed document,
    routing replayed from `routed` [P + R - 1, layers, top_k] when given."""
    seq = torch.tensor(prompt + response)
    tgt = torch.full_like(seq, -100)
    tgt[len(prompt) - 1:-1] = seq[len(prompt):]
    rows = None
    if routed is not None:  # the last token has no record (-1: the router's own choice)
        rows = torch.cat([torch.from_numpy(routed).long(), torch.full((1, *routed.shape[1:]), -1)])
    cu = torch.tensor([0, len(seq)], dtype=torch.int32)
    with torch.no_grad():
        lp, _ = model(seq, cu, targets=tgt, routed_experts=rows)
    return lp[len(prompt) - 1:-1]


def test_recorded_routing_is_the_full_forwards_and_replaying_it_closes_a_router_mismatch():
    """record_routing: each response comes with the experts its tokens went to ([P + R - 1, layers, top_k] uint8),
    as a full forward of the sequence routes them. Replayed by a trainer whose router differs from the engine's,
    they bring the trainer's logprobs back near the engine's (what routing replay is for)."""
    model = tiny_moe(seed=2)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (6, 13, 1, 9)]
    params = SamplingParams(temperature=1.0, max_tokens=10)
    free = TorchGenerator(model, eos_token_ids=[]).generate(prompts, params, seeds=[1, 2, 3, 4])
    eos = free.token_ids[1][3]  # row 1 stops early: rows of one batch then read different token counts
    out = TorchGenerator(model, eos_token_ids=[eos], max_batch=3).generate(prompts, params, seeds=[1, 2, 3, 4],
                                                                         record_routing=True)
    assert out.finish_reasons[1] == "stop"
    layers, k = len(model.model.layers), model.config.num_experts_per_tok
    for prompt, toks, routed in zip(prompts, out.token_ids, out.routed_experts):
        assert routed.dtype == np.uint8 and routed.shape == (len(prompt) + len(toks) - 1, layers, k)
        seq = torch.tensor(prompt + toks[:-1])
        with model.record_routing() as rec, torch.no_grad():
            model(seq, torch.tensor([0, len(seq)], dtype=torch.int32))
        for i in range(layers):
            assert torch.equal(torch.from_numpy(routed[:, i]).long(), rec[i][0]), i
    assert TorchGenerator(model, []).generate(prompts, params, seeds=[1, 2, 3, 4]).routed_experts is None

    trainer = tiny_moe(seed=2)  # the engine's weights but for a nudged router: some tokens pick other experts
    with torch.no_grad():
        for layer in trainer.model.layers:
            layer.mlp.gate.weight.add_(0.05 * torch.randn(layer.mlp.gate.weight.shape, generator=g))
    gaps = {"own": [], "replay": []}
    agreement = torch.zeros(2, dtype=torch.float64)
    for prompt, toks, lps, routed in zip(prompts, out.token_ids, out.logprobs, out.routed_experts):
        engine = torch.tensor(lps)
        gaps["own"].append((_response_logprobs(trainer, prompt, toks) - engine).abs())
        with trainer.count_replay_agreement("cpu") as counts:
            gaps["replay"].append((_response_logprobs(trainer, prompt, toks, routed) - engine).abs())
        agreement += counts
        # the engine's own weights with its own routing replayed: its logprobs exactly
        assert (_response_logprobs(model, prompt, toks, routed) - engine).abs().max() < 1e-5
    # the nudged router picks other experts for some of the engine's routes (what routing/replay_agreement logs)
    assert 0.5 < agreement[0] / agreement[1] < 1, agreement
    own, replay = (torch.cat(v).mean().item() for v in (gaps["own"], gaps["replay"]))
    # about half the gap is gone (0.052 vs 0.101, seeded); the rest is the nudged router's own weights of the experts
    assert replay < 0.6 * own, (replay, own)

    with pytest.raises(ValueError, match="dense"):
        TorchGenerator(from_config(dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=16), dtype=torch.float32), []).generate(prompts, params,
                                                                                         record_routing=True)
