"""golong.models vs transformers on tiny random Qwen3 (dense, tied) and Qwen3-MoE (YaRN, mixed layers)."""

from __future__ import annotations

import json

import pytest
import torch

import golong.models as gm
from tests.golong.model_fixtures import build_hf, hf_logits_per_doc, packed_batch, rel

LENGTHS = [5, 17, 11]  # odd document lengths, packed


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    """(kind, transformers model, its save_pretrained dir, golong model loaded from it), fp32."""
    hf = build_hf(request.param)
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf.save_pretrained(path)
    model = gm.from_pretrained(path, dtype=torch.float32)
    return request.param, hf, path, model


@pytest.fixture(params=["kernels", "sdpa"])
def attn(request, pair):
    """Run the test with each single-device attention path (kernels.flash_attention / torch SDPA)."""
    pair[3].set_attention_backend(request.param)
    yield request.param
    pair[3].set_attention_backend("auto")


def test_logits_packed_match_transformers_per_doc(pair, attn):
    kind, hf, _, model = pair
    ids, cu = packed_batch(LENGTHS)
    with torch.no_grad():
        ref = hf_logits_per_doc(hf, ids, cu)
        out = torch.full_like(ref, float("nan"))
        out.copy_(model.logits(model(ids, cu)))
    assert out.shape == (sum(LENGTHS), 1000)
    assert rel(out, ref) <= 1e-5, (kind, attn)
    # explicit positions restarting per document = the default
    pos = gm.packed_position_ids(cu, ids.numel())
    assert pos[cu[1].item()] == 0 and pos[-1] == LENGTHS[-1] - 1
    with torch.no_grad():
        assert torch.equal(model(ids, cu, position_ids=pos), model(ids, cu))


def test_fused_logprob_entropy_match_log_softmax(pair):
    _, hf, _, model = pair
    ids, cu = packed_batch(LENGTHS, seed=3)
    targets = torch.randint(0, 1000, ids.shape)
    targets[[2, 20]] = -100
    temperature = 0.7
    with torch.no_grad():
        logp_ref = torch.log_softmax(hf_logits_per_doc(hf, ids, cu).double() / temperature, -1)
        lp, ent = model.logprob_entropy(model(ids, cu), targets, temperature)
        lp2, ent2 = model(ids, cu, targets=targets, temperature=temperature)
    valid = targets != -100
    lp_ref = logp_ref.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    ent_ref = -(logp_ref.exp() * logp_ref).sum(-1)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert rel(lp[valid], lp_ref[valid]) <= 1e-5
    assert rel(ent[valid], ent_ref[valid]) <= 1e-5
    assert torch.all(lp[~valid] == 0) and torch.all(ent[~valid] == 0)
    assert torch.equal(lp, lp2) and torch.equal(ent, ent2)


def _loss(logp: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """A policy-gradient-like scalar touching logprob and entropy through every logit."""
    lp = logp.gather(1, targets[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    return (coef * lp).sum() + 0.1 * ent.sum()


def test_gradients_match_transformers(pair, attn):
    kind, hf, _, model = pair
    ids, cu = packed_batch(LENGTHS, seed=5)
    targets = torch.randint(0, 1000, ids.shape)
    coef = torch.randn(ids.shape, dtype=torch.float64)
    hf.zero_grad()
    model.zero_grad()
    _loss(torch.log_softmax(hf_logits_per_doc(hf, ids, cu).double(), -1), targets, coef).backward()
    lp, ent = model.logprob_entropy(model(ids, cu), targets)
    ((coef * lp.double()).sum() + 0.1 * ent.double().sum()).backward()
    hf_params = dict(hf.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(hf_params), (kind, sorted(set(hf_params) ^ set(names)))
    for name, p in model.named_parameters():
        g_ref = hf_params[name].grad
        assert p.grad is not None and g_ref is not None, name
        assert g_ref.norm() > 0, name
        assert rel(p.grad, g_ref) <= 1e-4, (kind, attn, name, rel(p.grad, g_ref))


def test_activation_checkpointing_same_gradients(pair):
    _, _, _, model = pair
    ids, cu = packed_batch([9, 6], seed=7)
    targets = torch.randint(0, 1000, ids.shape)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(ckpt)
        lp, ent = model(ids, cu, targets=targets)
        (lp.sum() + ent.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.set_activation_checkpointing(False)
    model.zero_grad()
    for n in grads[0]:
        assert rel(grads[1][n], grads[0][n]) <= 1e-6, n
    # and it does recompute: the forward keeps only each layer's input for backward, not its activations
    saved = []
    for ckpt in (False, True):
        model.set_activation_checkpointing(ckpt)
        n = [0]

        def pack(t, n=n):
            n[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, cu, targets=targets)
        saved.append(n[0])
    model.set_activation_checkpointing(False)
    assert saved[1] < saved[0] / 3, saved


def test_checkpointing_that_keeps_attention_recomputes_all_but_the_attention(pair, attn, monkeypatch):
    """keep_attention: the same gradients as no checkpointing (bitwise here); the attention runs once per layer
    (plain checkpointing: twice); after the forward the attention's output is held for backward and its q, k, v
    are not (the kernels' attention saves q, k, v themselves: they are recomputed; SDPA saves per-document
    views, which keep them)."""
    import gc
    import weakref

    from golong.models.attention import Attention

    _, _, _, model = pair
    ids, cu = packed_batch([9, 6, 1], seed=8)
    targets = torch.randint(0, 1000, ids.shape)
    layers = len(model.model.layers)
    attend, calls, refs = Attention.attend, [0], []

    def spy(self, q, k, v, *args):
        calls[0] += 1
        out = attend(self, q, k, v, *args)
        refs.append((weakref.ref(q), weakref.ref(out)))
        return out

    monkeypatch.setattr(Attention, "attend", spy)
    grads, held = {}, {}
    for mode in ("none", "full", "keep"):
        model.zero_grad()
        model.set_activation_checkpointing(mode != "none", keep_attention=mode == "keep")
        calls[0], refs[:] = 0, []
        lp, ent = model(ids, cu, targets=targets)
        gc.collect()
        held[mode] = (sum(q() is not None for q, _ in refs), sum(o() is not None for _, o in refs))
        (lp.sum() + ent.sum()).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert calls[0] == (2 * layers if mode == "full" else layers), (mode, calls[0])
    model.set_activation_checkpointing(False)
    model.zero_grad()
    for n in grads["none"]:
        assert rel(grads["keep"][n], grads["none"][n]) <= 1e-6, n
    assert held["none"] == (layers, layers) and held["full"] == (0, 0)
    assert held["keep"] == ((0 if attn == "kernels" else layers), layers)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_save_sharded_then_transformers_and_golong_load(pair, layout, tmp_path):
    kind, hf, _, model = pair
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model-00009-of-00009.safetensors").write_text("an earlier export's shard")  # replaced atomically
    model.save_pretrained(out, max_shard_bytes=200_000, expert_layout=layout)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((out / f).exists() for f in files)
    assert not (out / "model-00009-of-00009.safetensors").exists() and not list(tmp_path.glob(".ckpt.*"))
    keys = set(index["weight_map"])
    if kind == "moe":
        per_expert = "model.layers.0.mlp.experts.3.up_proj.weight" in keys
        assert per_expert == (layout == "per_expert")
        assert ("model.layers.0.mlp.experts.gate_up_proj" in keys) == (layout == "fused")
    assert ("lm_head.weight" in keys) == (kind == "moe")  # dense is tied

    ids, cu = packed_batch([8, 13], seed=11)
    hf2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = hf_logits_per_doc(hf2, ids, cu), hf_logits_per_doc(hf, ids, cu)
        # same weights, same code: equal up to fp32 summation order (transformers' grouped_mm path
        # differs by ~1e-8 between fused and per-expert loads); a wrong weight would be O(1)
        assert rel(a, b) <= 1e-6
    back = gm.from_pretrained(out, dtype=torch.float32)
    for (n, p), (n2, p2) in zip(model.named_parameters(), back.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n


def test_saved_shards_respect_the_size_limit_index_and_dtype(pair, tmp_path):
    """Shards hold at most max_shard_bytes of tensors (a single larger tensor gets its own file); the index's
    total_size is the tensors' bytes, as transformers writes it; config.json records the saved dtype; a
    directory that is not a plain export is refused."""
    from safetensors import safe_open

    from golong.models.checkpoint import hf_state_items

    _, _, _, model = pair
    limit = 150_000
    model.save_pretrained(tmp_path / "s", max_shard_bytes=limit, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    order = [k for k, _ in hf_state_items(model)]  # the order the tensors are written in
    total, per_file = 0, {}
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(str(tmp_path / "s" / f), "pt") as st:
            sizes = [st.get_tensor(k).numel() * 2 for k in sorted(st.keys(), key=order.index)]
            assert all(st.get_tensor(k).dtype == torch.bfloat16 for k in st.keys())
        per_file[f] = sizes
        total += sum(sizes)
        assert sum(sizes) <= limit or len(sizes) == 1, (f, sizes)
    assert total == sum(p.numel() * 2 for p in model.parameters())
    assert index["metadata"]["total_size"] == total
    files = list(per_file.values())  # greedy: a file was closed only because the next tensor did not fit
    assert all(sum(a) + b[0] > limit for a, b in zip(files, files[1:]))
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    # a shard filled exactly to the limit is kept whole (the limit is inclusive)
    exact = sum(t.numel() * 2 for _, t in list(hf_state_items(model))[:3])
    model.save_pretrained(tmp_path / "e", max_shard_bytes=exact, dtype=torch.bfloat16)
    first = json.loads((tmp_path / "e" / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(k for k, f in first.items() if f.startswith("model-00001-")) == sorted(order[:3])
    (tmp_path / "s" / "extra").mkdir()  # a directory inside: not an export, never replaced
    with pytest.raises(FileExistsError, match="holds no earlier Hugging Face export"):
        model.save_pretrained(tmp_path / "s")


def test_bf16_load_and_strictness(pair, tmp_path):
    kind, hf, path, _ = pair
    model = gm.from_pretrained(path, dtype=torch.bfloat16)
    ref = dict(hf.named_parameters())
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, ref[n].to(torch.bfloat16)), n
    # a checkpoint key the model does not have is an error, not silently dropped; each mismatch is a ConfigError
    # (the CLI prints it as one line, not a traceback)
    from safetensors.torch import load_file, save_file

    from golong.config import ConfigError

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    sd = load_file(path / "model.safetensors")
    sd["model.layers.9.mlp.foo.weight"] = torch.zeros(2)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="match no parameter"):
        gm.from_pretrained(bad, dtype=torch.float32)
    # a tensor of the wrong shape
    del sd["model.layers.9.mlp.foo.weight"]
    sd["model.norm.weight"] = torch.ones(65)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="does not fit parameter model.norm.weight"):
        gm.from_pretrained(bad, dtype=torch.float32)
    # and a missing one
    del sd["model.norm.weight"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="not \\(fully\\) found"):
        gm.from_pretrained(bad, dtype=torch.float32)
    sd["model.norm.weight"] = load_file(path / "model.safetensors")["model.norm.weight"]
    if kind == "dense":  # an expert key on a layer without experts: named as unknown, not a KeyError
        sd["model.layers.1.mlp.experts.0.down_proj.weight"] = torch.zeros(4, 4)
        save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ConfigError, match="match no parameter"):
            gm.from_pretrained(bad, dtype=torch.float32)
    else:  # one expert's gate one row too long and its up one row short: the element count still adds up
        gate, up = "model.layers.0.mlp.experts.1.gate_proj.weight", "model.layers.0.mlp.experts.1.up_proj.weight"
        rows = sd[gate].shape[0]
        sd[gate] = torch.cat([sd[gate], sd[up][:1]])
        sd[up] = sd[up][1:]
        save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ConfigError, match=rf"gate_proj.weight: shape \({rows + 1}, .*expected \({rows}, \d+\) per"):
            gm.from_pretrained(bad, dtype=torch.float32)
    # a damaged shard (an interrupted download) and a damaged index: errors naming the file
    sd = load_file(path / "model.safetensors")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=rf"^{bad / 'model.safetensors'}: not a readable safetensors file \("):
        gm.from_pretrained(bad, dtype=torch.float32)
    (bad / "model.safetensors").write_bytes(data)
    index = bad / "model.safetensors.index.json"
    for text, why in (('{"weight_map": {"a": ', "not valid JSON"), ('{"metadata": {}}', "holds no weight_map"),
                      ('{"weight_map": {"a": 3}}', "weight_map must map each tensor name to a file name")):
        index.write_text(text)
        with pytest.raises(ConfigError, match=rf"^{index}: {why}"):
            gm.from_pretrained(bad, dtype=torch.float32)


def test_attention_backend_names_match_the_config(pair):
    import dataclasses

    from golong.config import ModelConfig as RunModelConfig
    from golong.models.attention import ATTENTION_BACKENDS

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(RunModelConfig)}["attn_backend"]
    assert tuple(choices) == ATTENTION_BACKENDS  # model.attn_backend reaches set_attention_backend unchanged
    model = pair[3]
    with pytest.raises(ValueError, match="valid: auto, kernels, triton, torch, flash_attn, varlen_attn, sdpa"):
        model.set_attention_backend("xformers")
    ids = torch.randint(0, 100, (21,), generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0, 8, 21], dtype=torch.int32)
    outs = {}
    for backend in ("sdpa", "torch"):  # torch SDPA per document vs kernels.flash_attention's torch backend
        model.set_attention_backend(backend)
        assert all(layer.self_attn.backend == backend for layer in model.model.layers)
        with torch.no_grad():
            outs[backend] = model(ids, cu)
    model.set_attention_backend("auto")
    assert rel(outs["torch"], outs["sdpa"]) < 1e-5


def test_kv_cache_decoding_matches_full_forward(pair):
    """Ragged prompts prefilled in one batch (in two chunks), then decoded with rows finishing early:
    every real token's hidden state equals the full packed forward of that row's sequence."""
    _, _, _, model = pair
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(0, 1000, (n,), generator=g) for n in (6, 11, 1)]
    steps = 4
    gen = [torch.randint(0, 1000, (steps,), generator=g) for _ in prompts]
    active = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]  # row 1 finishes after 2 tokens
    cache = model.new_kv_cache(batch=3, max_len=20)
    got: list[list[torch.Tensor]] = [[] for _ in prompts]

    def feed(chunks: list[torch.Tensor]) -> None:
        n = torch.tensor([c.numel() for c in chunks])
        batch = torch.zeros(3, max(1, int(n.max())), dtype=torch.long)
        for b, c in enumerate(chunks):
            batch[b, : c.numel()] = c
        with torch.no_grad():
            h = model.forward_cached(batch, cache, n)
        for b, c in enumerate(chunks):
            got[b].extend(h[b, : c.numel()])

    feed([p[:4] for p in prompts])  # chunked prefill: first 4 tokens of each prompt (or fewer)
    feed([p[4:] for p in prompts])
    for t in range(steps):
        feed([gen[b][t:t + 1] if active[b][t] else gen[b][:0] for b in range(3)])
    assert cache.lengths.tolist() == [p.numel() + sum(a) for p, a in zip(prompts, active)]
    for b, p in enumerate(prompts):
        seq = torch.cat([p, gen[b][: sum(active[b])]])
        with torch.no_grad():
            ref = model(seq, torch.tensor([0, seq.numel()], dtype=torch.int32))
        assert rel(torch.stack(got[b]), ref) <= 1e-5, b
    with pytest.raises(ValueError, match="overflow"):
        model.forward_cached(torch.zeros(3, 20, dtype=torch.long), cache)


def test_kv_cache_full_to_the_last_slot(pair):
    """A row one token short of max_len decodes next to a row prefilling several tokens: the short row's
    padding (positions past max_len) is never written, the cache fills exactly, one more token overflows."""
    _, _, _, model = pair
    g = torch.Generator().manual_seed(21)
    first, second = torch.randint(0, 1000, (8,), generator=g), torch.randint(0, 1000, (5,), generator=g)
    cache = model.new_kv_cache(batch=2, max_len=8)
    batch = torch.zeros(2, 7, dtype=torch.long)
    batch[0] = first[:7]
    with torch.no_grad():
        model.forward_cached(batch, cache, torch.tensor([7, 0]))
        batch = torch.zeros(2, 5, dtype=torch.long)
        batch[0, 0], batch[1] = first[7], second
        h = model.forward_cached(batch, cache, torch.tensor([1, 5]))
        ref0 = model(first, torch.tensor([0, 8], dtype=torch.int32))
        ref1 = model(second, torch.tensor([0, 5], dtype=torch.int32))
    assert cache.lengths.tolist() == [8, 5]
    assert rel(h[0, :1], ref0[7:]) <= 1e-5 and rel(h[1], ref1) <= 1e-5
    with pytest.raises(ValueError, match="a row needs 9 positions, max_len=8"):
        model.forward_cached(torch.zeros(2, 1, dtype=torch.long), cache, torch.tensor([1, 0]))


def _rewrite(path, file: str, edit) -> None:
    """Load one safetensors file of a checkpoint, let `edit` change its dict, write it back."""
    from safetensors.torch import load_file, save_file

    sd = load_file(path / file)
    edit(sd)
    save_file(sd, path / file, metadata={"format": "pt"})


def test_sharded_checkpoint_errors_name_key_and_file(pair, tmp_path):
    """Strict loading of a sharded checkpoint: every bad key is named with its file, and a key given twice
    cannot make up for a missing one (the element count used to balance, leaving memory unwritten)."""
    import shutil

    from safetensors.torch import load_file

    kind, _, _, model = pair
    good = tmp_path / "good"
    model.save_pretrained(good, max_shard_bytes=200_000)
    where = json.loads((good / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(where.values()))

    def variant(name: str):
        shutil.copytree(good, tmp_path / name)
        return tmp_path / name

    # gate_proj duplicated into another shard, up_proj (same shape) dropped
    gate, up = ((f"model.layers.0.mlp.experts.1.{p}.weight" for p in ("gate_proj", "up_proj")) if kind == "moe"
                else ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"))
    other = next(f for f in files if f != where[gate])
    bad = variant("dup")
    _rewrite(bad, where[up], lambda sd: sd.pop(up))
    _rewrite(bad, other, lambda sd: sd.update({gate: load_file(good / where[gate])[gate]}))
    with pytest.raises(ValueError, match=rf"{gate} is in both {where[gate]} and {other}|"
                                         rf"{gate} is in both {other} and {where[gate]}"):
        gm.from_pretrained(bad, dtype=torch.float32)
    # missing: the checkpoint key (per expert for experts) and the file the index puts it in
    bad = variant("missing")
    _rewrite(bad, where[up], lambda sd: sd.pop(up))
    with pytest.raises(ValueError, match=rf"not \(fully\) found.*{up} \({where[up]}\)"):
        gm.from_pretrained(bad, dtype=torch.float32)
    # unknown and wrongly shaped keys name their file
    bad = variant("unknown")
    _rewrite(bad, files[1], lambda sd: sd.update({"model.layers.0.mlp.foo.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=rf"match no parameter.*model.layers.0.mlp.foo.weight \({files[1]}\)"):
        gm.from_pretrained(bad, dtype=torch.float32)
    norm = "model.layers.1.post_attention_layernorm.weight"
    bad = variant("shape")
    _rewrite(bad, where[norm], lambda sd: sd.update({norm: torch.ones(65)}))
    with pytest.raises(ValueError, match=rf"{norm}: shape \(65,\) does not fit .*, in {where[norm]}"):
        gm.from_pretrained(bad, dtype=torch.float32)
    if kind == "moe":
        bad = variant("expert_range")
        key = "model.layers.0.mlp.experts.8.up_proj.weight"
        _rewrite(bad, files[1], lambda sd: sd.update({key: torch.zeros(48, 64)}))
        with pytest.raises(ValueError, match=rf"{key} \({files[1]}\): expert 8 does not exist, the config has 8"):
            gm.from_pretrained(bad, dtype=torch.float32)
        bad = variant("both_layouts")
        fused = "model.layers.0.mlp.experts.down_proj"
        w = model.model.layers[0].mlp.experts.down_proj.detach().clone()
        _rewrite(bad, files[0], lambda sd: sd.update({fused: w}))
        with pytest.raises(ValueError, match=rf"both fused and per-expert keys.*{fused}"):
            gm.from_pretrained(bad, dtype=torch.float32)


def test_a_loaded_model_saves_with_the_tokenizer_files_of_the_directory_it_came_from(tmp_path):
    """save_pretrained copies the tokenizer and generation config from the directory the model was loaded from
    when no copy_files_from is given (vLLM needs them beside the weights)."""
    hf = build_hf("dense")
    src = tmp_path / "src"
    hf.save_pretrained(src)
    (src / "tokenizer.json").write_text('{"fake": true}')
    gm.from_pretrained(src, dtype=torch.float32).save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"fake": true}'


def test_tied_checkpoint_with_its_own_lm_head(tmp_path):
    """tie_word_embeddings with an lm_head.weight in the checkpoint: an equal copy loads; a different one
    raises (transformers 5 unties and scores with it, vLLM ignores it: silently dropping it diverged
    from transformers by a relative logit error of ~1.4)."""
    hf = build_hf("dense")
    assert hf.config.tie_word_embeddings  # the tied fixture
    ckpt = tmp_path / "tied"
    hf.save_pretrained(ckpt)
    emb = hf.model.embed_tokens.weight.detach().clone()
    _rewrite(ckpt, "model.safetensors", lambda sd: sd.update({"lm_head.weight": emb}))
    back = gm.from_pretrained(ckpt, dtype=torch.float32)
    assert back.lm_head is None and torch.equal(back.model.embed_tokens.weight, emb)
    back16 = gm.from_pretrained(ckpt, dtype=torch.bfloat16)  # compared in the dtype loaded to: still equal
    assert back16.lm_head is None and torch.equal(back16.model.embed_tokens.weight, emb.bfloat16())
    _rewrite(ckpt, "model.safetensors", lambda sd: sd.update({"lm_head.weight": emb.flip(0)}))
    with pytest.raises(ValueError, match="lm_head.weight in model.safetensors differs from model.embed_tokens"):
        gm.from_pretrained(ckpt, dtype=torch.float32)


def test_moe_without_renormalised_top_k_matches_transformers(tmp_path):
    """norm_topk_prob=False (Qwen1.5/2-MoE style): the raw softmax top-k weights, not renormalised — the
    fixture's MoE has it on, so a block that ignored the config's flag would pass every other test."""
    from transformers import Qwen3MoeForCausalLM

    from tests.golong.model_fixtures import hf_config, randomize_

    cfg = hf_config("moe")
    cfg.norm_topk_prob = False
    torch.manual_seed(2)
    hf = Qwen3MoeForCausalLM(cfg).float().eval()
    randomize_(hf, 2)
    hf.save_pretrained(tmp_path)
    model = gm.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.model.layers[0].mlp.norm_topk_prob is False
    ids, cu = packed_batch([7, 12], seed=9)
    with torch.no_grad():
        assert rel(model.logits(model(ids, cu)), hf_logits_per_doc(hf, ids, cu)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_rope_router_in_low_precision_match_transformers_exactly(pair, dtype):
    """The casts the fp32 parity tests cannot see: RMSNorm normalises in fp32 and casts before the weight,
    cos/sin come back in the activation dtype, the router's logits are in the model dtype (softmax in fp32
    inside moe_route) — each bit-equal to transformers' module at the same dtype (copies: the fixture's
    models stay fp32)."""
    import copy

    import kernels
    from golong.models.layers import rms_norm

    kind, hf, _, model = pair
    g = torch.Generator().manual_seed(17)
    x = (3 * torch.randn(13, 64, generator=g)).to(dtype)
    norm = model.model.layers[0].input_layernorm
    hf_norm = copy.deepcopy(hf.model.layers[0].input_layernorm).to(dtype)
    assert torch.equal(rms_norm(x, norm.weight.detach().to(dtype), norm.eps), hf_norm(x))
    pos = torch.tensor([0, 3, 17, 250, 1023, 3000])
    cos, sin = model.rotary(pos, dtype)
    hcos, hsin = hf.model.rotary_emb(x, pos[None])
    assert cos.dtype == sin.dtype == dtype
    assert torch.equal(cos, hcos[0]) and torch.equal(sin, hsin[0])
    if kind == "moe":
        moe = copy.deepcopy(model.model.layers[0].mlp).to(dtype)
        hf_gate = copy.deepcopy(hf.model.layers[0].mlp.gate).to(dtype)
        logits = moe.gate(x)
        hl, hscores, hidx = hf_gate(x)
        assert logits.dtype == dtype and torch.equal(logits, hl)
        r = kernels.moe_route(logits, moe.top_k, moe.norm_topk_prob)
        mine, theirs = r.expert_ids.sort(-1).indices, hidx.sort(-1).indices  # the top-k in expert order
        assert torch.equal(r.expert_ids.gather(1, mine), hidx.gather(1, theirs))
        assert torch.equal(r.weights.gather(1, mine), hscores.gather(1, theirs))


def test_attention_backend_dispatch(pair, monkeypatch):
    """Which attention each model.attn_backend runs (all numerically equal on CPU, so only a spy can tell):
    auto/sdpa -> SDPA per document on CPU; kernels -> kernels.flash_attention's own auto choice; triton /
    torch / flash_attn -> that flash_attention backend; under context parallelism ring_attention, whose
    local blocks honour triton / torch only."""
    import golong.models.attention as attention
    import kernels

    calls = []

    def flash(q, k, v, cu, *, causal, softmax_scale, backend, prefix_of=None):
        calls.append(("flash", backend, causal, softmax_scale) + (() if prefix_of is None else (prefix_of,)))
        return q.clone(), None

    def ring(q, k, v, cu, group, *, causal, softmax_scale, backend, prefix_of=None):
        calls.append(("ring", backend, causal, softmax_scale) + (() if prefix_of is None else (prefix_of,)))
        return q.clone()

    monkeypatch.setattr(kernels, "flash_attention", flash)
    monkeypatch.setattr(kernels, "ring_attention", ring)
    monkeypatch.setattr(attention, "sdpa_varlen", lambda q, k, v, cu, scale, prefix_of=None: calls.append(
        ("sdpa", scale) + (() if prefix_of is None else (prefix_of,))) or q.clone())
    attn = pair[3].model.layers[0].self_attn
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    cos, sin = pair[3].rotary(gm.packed_position_ids(cu, 9), x.dtype)
    scale = 32 ** -0.5
    single = {"auto": ("sdpa", scale), "sdpa": ("sdpa", scale), "kernels": ("flash", "auto", True, scale),
              "triton": ("flash", "triton", True, scale), "torch": ("flash", "torch", True, scale),
              "flash_attn": ("flash", "flash_attn", True, scale), "varlen_attn": ("flash", "varlen_attn", True, scale)}
    assert set(single) == set(attention.ATTENTION_BACKENDS)
    try:
        for backend, want in single.items():
            attn.backend = backend
            calls.clear()
            attn(x, cos, sin, cu)
            assert calls == [want], backend
            # shared prefixes reach the kernel; the peers' kernels, which take none, give way to ours
            prefix_of = torch.tensor([-1, 0], dtype=torch.int32)
            calls.clear()
            attn(x, cos, sin, cu, None, prefix_of)
            shared = ("flash", "auto", True, scale) if backend in ("flash_attn", "varlen_attn") else want
            assert calls == [shared + (prefix_of,)], backend
        monkeypatch.setattr(attention.dist, "get_world_size", lambda group=None: 2)
        for backend in attention.ATTENTION_BACKENDS:
            attn.backend = backend
            calls.clear()
            attn(x, cos, sin, cu, cp_group=object())
            assert calls == [("ring", backend if backend in ("triton", "torch") else "auto", True, scale)], backend
            calls.clear()
            attn(x, cos, sin, cu, object(), prefix_of)
            assert calls[0][-1] is prefix_of, backend
        monkeypatch.setattr(attention.dist, "get_world_size", lambda group=None: 1)  # a CP group of one rank
        attn.backend = "torch"
        calls.clear()
        attn(x, cos, sin, cu, cp_group=object())
        assert calls == [("flash", "torch", True, scale)]
    finally:
        attn.backend = "auto"


def test_loading_and_saving_many_shards_log_progress_only_when_slow(pair, tmp_path, monkeypatch, caplog):
    """Loading a checkpoint of many shards (a 30B model: minutes) was silent until it was done. It now logs
    shards and bytes done at an interval (PROGRESS_EVERY_S; 0 here: every step), and nothing for a load that
    is over sooner (a tiny model, at the default 30 s); writing one logs its shards and bytes alike."""
    import logging

    import golong.logger

    _, _, _, model = pair
    out = tmp_path / "ckpt"
    log = logging.getLogger("golong")
    log.addHandler(caplog.handler)  # it does not propagate to the root logger
    caplog.set_level(logging.INFO, logger="golong")
    try:
        model.save_pretrained(out, max_shard_bytes=200_000)
        gm.from_pretrained(out, dtype=torch.float32)
        assert "loading weights" not in caplog.text and "writing" not in caplog.text  # quick: no lines
        monkeypatch.setattr(golong.logger, "PROGRESS_EVERY_S", 0.0)
        model.save_pretrained(out, max_shard_bytes=200_000)
        gm.from_pretrained(out, dtype=torch.float32)
    finally:
        log.removeHandler(caplog.handler)
    files = sorted(out.glob("*.safetensors"))
    n, size = len(files), sum(f.stat().st_size for f in files)
    assert n > 2
    writes = [m for m in caplog.messages if m.startswith(f"writing {out}: ")]
    assert writes[-1].startswith(f"writing {out}: {n} shards, ") and writes[-1].endswith(", done"), writes[-1]
    loads = [m for m in caplog.messages if m.startswith(f"loading weights from {out}: ")]
    assert len(loads) > n  # a line per tensor here (interval 0), shard counts climbing to n
    assert [f"{k}/{n} shards" in " ".join(loads) for k in range(1, n + 1)] == [True] * n
    done = golong.logger._size(size)  # the files' bytes, headers included
    assert loads[-1].startswith(f"loading weights from {out}: {n}/{n} shards, {done} of {done} (") \
        and loads[-1].endswith(", done"), loads[-1]


@pytest.mark.parametrize("checkpointing", ["none", "plain", "keep_attention"])
def test_responses_sharing_one_prompt_copy_score_as_separate_sequences(pair, attn, checkpointing):
    """The actor's shared-prompt layout: prompt[:-1] once, then each response as [prompt[-1], response] with
    prefix_of pointing at the prompt (positions continuing after it). Logprob, entropy and every parameter's
    gradient equal those of the sequences packed whole, each with its own prompt copy."""
    kind, _, _, model = pair
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, 1000, (23,), generator=g)
    responses = [torch.randint(0, 1000, (n,), generator=g) for n in (6, 1, 9)]
    P = prompt.numel()

    def scored(ids_parts, first):  # targets: each part's next tokens from row `first` on, the last row none
        t = torch.full((sum(p.numel() for p in ids_parts),), -100)
        flat = torch.cat(ids_parts)
        t[first:flat.numel() - 1] = flat[first + 1:]
        return t

    whole = [torch.cat([prompt, r]) for r in responses]
    ids_a, tgt_a = torch.cat(whole), torch.cat([scored([w], P - 1) for w in whole])
    cu_a = torch.tensor([0] + torch.tensor([w.numel() for w in whole]).cumsum(0).tolist(), dtype=torch.int32)
    kids = [torch.cat([prompt[-1:], r]) for r in responses]
    ids_b = torch.cat([prompt[:-1]] + kids)
    tgt_b = torch.cat([torch.full((P - 1,), -100)] + [scored([c], 0) for c in kids])
    cu_b = torch.tensor([0, P - 1] + (P - 1 + torch.tensor([c.numel() for c in kids]).cumsum(0)).tolist(),
                        dtype=torch.int32)
    prefix_of = torch.tensor([-1, 0, 0, 0], dtype=torch.int32)
    assert torch.equal(tgt_a[tgt_a != -100], tgt_b[tgt_b != -100])
    weights = torch.randn(int((tgt_a != -100).sum()), 2, generator=g)

    def run(ids, cu, tgt, **kw):
        model.zero_grad(set_to_none=True)
        lp, ent = model(ids, cu, targets=tgt, temperature=0.8, **kw)
        keep = tgt != -100
        ((lp[keep] * weights[:, 0]).sum() + (ent[keep] * weights[:, 1]).sum()).backward()
        return lp[keep].detach(), ent[keep].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    model.set_activation_checkpointing(checkpointing != "none", keep_attention=checkpointing == "keep_attention")
    try:
        ref = run(ids_a, cu_a, tgt_a)
        ours = run(ids_b, cu_b, tgt_b, prefix_of=prefix_of)
    finally:
        model.set_activation_checkpointing(False)
        model.zero_grad(set_to_none=True)
    assert rel(ours[0], ref[0]) < 1e-5 and rel(ours[1], ref[1]) < 1e-5, (kind, attn)
    for name, grad in ref[2].items():
        assert rel(ours[2][name], grad) < 1e-4, (name, kind, attn, checkpointing)


@pytest.mark.parametrize("checkpointing", ["none", "plain", "keep_attention"])
def test_routing_replay_routes_every_moe_layer_through_the_given_experts(pair, checkpointing):
    """routed_experts: replaying the forward's own recorded routing changes nothing (outputs and gradients); other
    experts are what each MoE layer then routes through (its record shows them), rows with -1 keeping the router's
    choice, dense layers' columns unread; activation checkpointing recomputes with the same experts (its gradients
    equal the plain forward's)."""
    kind, _, _, model = pair
    ids, cu = packed_batch([9, 14, 5], seed=4)
    tgt = torch.roll(ids, -1)
    layers, k = len(model.model.layers), model.config.num_experts_per_tok
    if kind == "dense":
        with pytest.raises(ValueError, match="dense model"):
            model(ids, cu, routed_experts=torch.zeros(ids.numel(), layers, 1, dtype=torch.long))
        return
    moe = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, gm.moe.MoE)]
    assert 0 < len(moe) < layers  # the fixture has a dense layer too
    with pytest.raises(ValueError, match="routed_experts must be"):
        model(ids, cu, routed_experts=torch.zeros(ids.numel() - 1, layers, k, dtype=torch.long))
    weights = torch.randn(ids.numel(), 2, generator=torch.Generator().manual_seed(3))

    def run(ac: bool, **kw):
        model.zero_grad(set_to_none=True)
        model.set_activation_checkpointing(ac, keep_attention=checkpointing == "keep_attention")
        try:
            with model.record_routing() as rec:
                lp, ent = model(ids, cu, targets=tgt, temperature=0.9, **kw)
            ((lp * weights[:, 0]).sum() + (ent * weights[:, 1]).sum()).backward()
        finally:
            model.set_activation_checkpointing(False)
        return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, rec

    ac = checkpointing != "none"
    base = run(False)
    own = torch.full((ids.numel(), layers, k), 99, dtype=torch.long)  # dense columns: never read
    for i in moe:
        own[:, i] = base[3][i][0]
    same = run(ac, routed_experts=own.to(torch.uint8))
    assert rel(same[0], base[0]) < 1e-6 and rel(same[1], base[1]) < 1e-6
    for name, grad in base[2].items():
        assert rel(same[2][name], grad) < 1e-5, (name, checkpointing)

    g = torch.Generator().manual_seed(5)
    other = own.clone()
    for i in moe:
        other[:, i] = torch.stack([torch.randperm(model.config.num_experts, generator=g)[:k]
                                   for _ in range(ids.numel())])
    other[3, moe[0]] = -1  # no record for this token in this layer
    replayed = run(ac, routed_experts=other)
    plain = run(False, routed_experts=other) if ac else replayed
    with model.count_replay_agreement("cpu") as agreement, torch.no_grad():  # (own choice, replayed) per layer x row
        model(ids, cu, routed_experts=own)
        assert agreement.tolist() == [len(moe) * ids.numel()] * 2
        model(ids, cu, routed_experts=other)
    same = sum(set(other[t, i].tolist()) == set(own[t, i].tolist()) for i in moe for t in range(ids.numel())
               if not (t == 3 and i == moe[0]))
    assert agreement.tolist() == [len(moe) * ids.numel() + same, 2 * len(moe) * ids.numel() - 1]
    assert all(layer.mlp.agreement is None for layer in model.model.layers if isinstance(layer.mlp, gm.moe.MoE))
    for i in moe:  # what each layer routed through (the first forward's record; checkpointing records recomputes too)
        want = other[:, i].clone()
        if i == moe[0]:
            want[3] = own[3, i]
        assert torch.equal(replayed[3][i][0], want), i
    assert rel(replayed[0], base[0]) > 1e-3  # other experts, other outputs
    assert rel(replayed[0], plain[0]) < 1e-6
    for name, grad in plain[2].items():  # the recompute replays the same experts
        assert rel(replayed[2][name], grad) < 1e-5, (name, checkpointing)


def test_sdpa_varlen_treats_rows_past_the_last_document_as_one_more():
    """Rows past cu_seqlens[-1] got no output (the model's CPU attention then failed on a shape, or with cu = [0]
    returned zeros); kernels.flash_attention treats them as one more document, and so does it now."""
    import kernels
    from golong.models.attention import sdpa_varlen

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(10, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    for cu in ([0, 4, 8], [0], [0, 3, 3, 7]):
        cu_t = torch.tensor(cu, dtype=torch.int32)
        ref = kernels.flash_attention(q, k, v, cu_t, softmax_scale=0.25, backend="torch")[0]
        out = sdpa_varlen(q, k, v, cu_t, 0.25)
        assert out.shape == ref.shape and rel(out, ref) < 1e-6, cu  # the torch kernel accumulates in fp32

