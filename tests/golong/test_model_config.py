"""Config parsing, RoPE / YaRN frequencies vs transformers, random init."""

from __future__ import annotations

import pytest
import torch

import golong.models as gm
from golong.models.config import ConfigError, ModelConfig
from golong.models.layers import RotaryEmbedding
from tests.golong.model_fixtures import hf_config

# config.json of Qwen3-30B-A3B as published (HF 4.x spelling: rope_theta + rope_scaling)
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


def test_parse_real_config_and_roundtrip():
    c = ModelConfig.from_hf(QWEN3_30B_A3B)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        2048, 48, 32, 4, 128)
    assert c.is_moe and c.num_experts == 128 and c.num_experts_per_tok == 8 and c.norm_topk_prob
    assert c.rope_theta == 1e6 and c.rope_scaling is None and all(c.layer_is_moe(i) for i in range(48))
    hf = c.to_hf(dtype="bfloat16")
    assert hf["eos_token_id"] == 151645 and hf["rope_theta"] == 1e6 and hf["torch_dtype"] == "bfloat16"
    assert ModelConfig.from_hf(hf) == c
    yarn = dict(QWEN3_30B_A3B, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 262144})
    cy = ModelConfig.from_hf(yarn)
    assert cy.rope_scaling.factor == 4.0 and cy.rope_scaling.original_max_position_embeddings == 262144
    assert ModelConfig.from_hf(cy.to_hf()) == cy


@pytest.mark.parametrize("field,value,match", [
    ("use_sliding_window", True, "use_sliding_window"),
    ("attention_bias", True, "attention_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic'"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_type='linear'"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e6}, "rope_parameters.rope_type"),
    ("model_type", "llama", "model_type"),
    ("layer_types", ["full_attention", "sliding_attention"], "layer_types"),
    ("num_key_value_heads", 5, "num_key_value_heads"),
    ("num_experts", 0, "num_experts"),
    ("dual_chunk_attention_config", {"chunk_size": 262144}, "dual_chunk_attention_config"),
    ("attention_dropout", 0.1, "attention_dropout"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor"),
    ("mlp_bias", True, "mlp_bias"),
    # Qwen3-*-FP8: loading failed only later, on "14 checkpoint tensors match no parameter (..weight_scale_inv)"
    ("quantization_config", {"quant_method": "fp8", "fmt": "e4m3"}, "quantization_config=.*quantized"),
    ("num_experts_per_tok", 0, "num_experts_per_tok=0 must be in \\[1, 128\\]"),
    ("num_experts_per_tok", 129, "num_experts_per_tok=129 must be in \\[1, 128\\]"),
    ("moe_intermediate_size", 0, "moe_intermediate_size"),
    # sizes below 1 failed deep in the model build (a negative dimension, an index error), not naming the field
    ("hidden_size", -1, "hidden_size=-1 must be an integer >= 1"),
    ("num_hidden_layers", 0, "num_hidden_layers=0 must be an integer >= 1"),
    ("vocab_size", 2.5, "vocab_size=2.5 must be an integer >= 1"),
    ("num_key_value_heads", -4, "num_key_value_heads=-4 must be an integer >= 1"),
    ("head_dim", -128, "head_dim=-128 must be an integer >= 1"),
    ("num_experts", -8, "num_experts=-8 must be an integer >= 1"),
    ("moe_intermediate_size", -768, "moe_intermediate_size=-768 must be an integer >= 1"),
    ("rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}, "per layer type"),
])
def test_unrepresentable_config_fails_naming_the_field(field, value, match):
    cfg = dict(QWEN3_30B_A3B, **{field: value})
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf(cfg)


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 1e6},
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0, "original_max_position_embeddings": 4096,
     "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 2048,
     "attention_factor": 1.3},
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 8192,
     "mscale": 0.707, "mscale_all_dim": 1.2},  # DeepSeek-style attention factor
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768,
     "beta_fast": 8.0, "beta_slow": 8.5},  # truncated bounds meet at dimension 30: a zero-width ramp
])
def test_rope_frequencies_equal_transformers(rope):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    kw = dict(vocab_size=1000, hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
              num_hidden_layers=1, intermediate_size=64, max_position_embeddings=131072)
    hf_cfg = Qwen3Config(**kw, rope_parameters=dict(rope))
    ref = Qwen3RotaryEmbedding(hf_cfg)
    ours = RotaryEmbedding(ModelConfig.from_hf(hf_cfg))
    assert torch.equal(ours.inv_freq_cpu, ref.inv_freq)
    assert ours.attention_scaling == pytest.approx(ref.attention_scaling, rel=1e-12)
    pos = torch.tensor([0, 1, 977, 40_000, 131_071])
    cos_ref, sin_ref = ref(torch.zeros(1, dtype=torch.float32), pos[None])
    cos, sin = ours(pos, torch.float32)
    assert torch.equal(cos, cos_ref[0]) and torch.equal(sin, sin_ref[0])
    # the HF 4.x spelling (rope_theta + rope_scaling) parses to the same frequencies
    old = {k: v for k, v in hf_cfg.to_dict().items() if k != "rope_parameters"}
    old["rope_theta"] = rope["rope_theta"]
    old["rope_scaling"] = None if rope["rope_type"] == "default" else {
        k: v for k, v in rope.items() if k != "rope_theta"}
    assert torch.equal(RotaryEmbedding(ModelConfig.from_hf(old)).inv_freq_cpu, ref.inv_freq)
    # and what to_hf writes reads back to the same config and frequencies
    parsed = ModelConfig.from_hf(hf_cfg)
    back = ModelConfig.from_hf(parsed.to_hf())
    assert back == parsed and torch.equal(RotaryEmbedding(back).inv_freq_cpu, ref.inv_freq)
    assert RotaryEmbedding(back).attention_scaling == ours.attention_scaling


def test_rope_keys_given_twice_read_as_transformers_reads_them():
    """A config holding rope_theta both at the top level and inside rope_parameters (and a YaRN
    original_max_position_embeddings both places): transformers takes the rope_parameters' theta and the top-level
    original length; golong's frequencies are the same."""
    import copy

    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    kw = dict(vocab_size=1000, hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
              num_hidden_layers=1, intermediate_size=64, max_position_embeddings=131072)
    for extra in ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
                  {"original_max_position_embeddings": 8192,
                   "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                       "original_max_position_embeddings": 32768}}):
        raw = {"model_type": "qwen3", **kw, **extra}
        ref = Qwen3RotaryEmbedding(Qwen3Config(**copy.deepcopy(raw)))  # it rewrites rope_parameters in place
        ours = RotaryEmbedding(ModelConfig.from_hf(copy.deepcopy(raw)))
        assert torch.equal(ours.inv_freq_cpu, ref.inv_freq), extra


def test_from_config_random_init_and_meta_free():
    model = gm.from_config(hf_config("moe"), dtype=torch.float32, device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    w = model.model.layers[0].mlp.experts.gate_up_proj
    assert w.shape == (8, 96, 64) and abs(w.std().item() - 0.02) < 0.002
    assert torch.equal(model.model.layers[2].self_attn.q_norm.weight, torch.ones(32))
    wide = gm.from_config(dict(hf_config("moe").to_dict(), initializer_range=0.1), dtype=torch.float32)
    assert abs(wide.model.layers[0].mlp.experts.gate_up_proj.std().item() - 0.1) < 0.01  # the config's std
    ids = torch.randint(0, 1000, (19,))
    cu = torch.tensor([0, 12, 19], dtype=torch.int32)
    h = model(ids, cu)
    assert h.shape == (19, 64) and torch.isfinite(h).all()
    dense = gm.from_config({**hf_config("dense").to_dict()}, dtype=torch.bfloat16)
    assert dense.lm_head is None and dense.lm_head_weight is dense.model.embed_tokens.weight
    assert dense.model.embed_tokens.weight.dtype == torch.bfloat16


def test_cpu_forward_does_not_import_liger():
    """Liger's Triton kernels need a GPU: the CPU path must not even import them."""
    import subprocess
    import sys

    cfg = {k: v for k, v in QWEN3_30B_A3B.items() if k != "architectures"}
    cfg.update(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, intermediate_size=96)
    # a plain dict config: the child imports neither transformers nor liger unless golong does
    code = ("import sys, torch, golong.models as gm\n"
            f"m = gm.from_config({cfg!r})\n"
            "lp, ent = m(torch.randint(0, 1000, (9,)), torch.tensor([0, 4, 9], dtype=torch.int32),"
            " targets=torch.randint(0, 1000, (9,)))\n"
            "(lp.sum() + ent.sum()).backward()\n"
            "assert not [k for k in sys.modules if k.startswith('liger_kernel')], 'liger imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_absent_fields_default_as_transformers():
    """Without head_dim, transformers' Qwen3Config uses 128 (not hidden // heads); Qwen3MoeConfig has no such
    field and derives it. Without num_key_value_heads they use their class defaults, 32 and 4."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    raw = dict(model_type="qwen3", vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
               num_attention_heads=64)
    ours, ref = ModelConfig.from_hf(raw), Qwen3Config.from_dict(raw)
    assert (ours.head_dim, ours.num_key_value_heads) == (ref.head_dim, ref.num_key_value_heads) == (128, 32)
    assert ModelConfig.from_hf(dict(raw, num_key_value_heads=None)).num_key_value_heads == 64  # null: MHA
    moe = dict(raw, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    ours, ref = ModelConfig.from_hf(moe), Qwen3MoeConfig.from_dict(moe)
    assert not hasattr(ref, "head_dim") and ours.head_dim == 64 // 64
    assert ours.num_key_value_heads == ref.num_key_value_heads == 4
    assert ours.norm_topk_prob == ref.norm_topk_prob  # absent: no renormalisation, as transformers reads it


def test_sparse_step_and_dense_layers_as_transformers():
    """Which layers are MoE (decoder_sparse_step, mlp_only_layers), as transformers builds them."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    for step, dense in ((2, [3]), (3, []), (1, [0, 4])):
        raw = dict(model_type="qwen3_moe", vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=8, decoder_sparse_step=step, mlp_only_layers=dense)
        hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**raw))
        want = [isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in hf.model.layers]
        assert [ModelConfig.from_hf(raw).layer_is_moe(i) for i in range(6)] == want, (step, dense)
        ours = gm.from_config(raw, dtype=torch.float32)
        assert [type(layer.mlp).__name__ == "MoE" for layer in ours.model.layers] == want


def test_untied_by_default_and_local_experts_spelling():
    from transformers import Qwen3Config, Qwen3MoeConfig

    raw = dict(model_type="qwen3", vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert ModelConfig.from_hf(raw).tie_word_embeddings is Qwen3Config.from_dict(raw).tie_word_embeddings is False
    moe = dict(raw, model_type="qwen3_moe", num_local_experts=6, num_experts_per_tok=2, moe_intermediate_size=8)
    c = ModelConfig.from_hf(moe)
    assert c.num_experts == 6 and not Qwen3MoeConfig.from_dict(moe).tie_word_embeddings
    hf = c.to_hf()
    assert hf["num_experts"] == 6 and "num_local_experts" not in hf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_transformers_where_eps_matters(dtype):
    """Activations of ~eps^0.5 scale (the eps term is half the mean square), odd width, weights away from 1."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from golong.models.layers import RMSNorm

    g = torch.Generator().manual_seed(5)
    eps = 1e-4
    x = (torch.randn(7, 3, 37, generator=g) * 1e-2).to(dtype)
    ours, ref = RMSNorm(37, eps, dtype=dtype), Qwen3RMSNorm(37, eps).to(dtype)
    with torch.no_grad():
        w = (1 + 0.3 * torch.randn(37, generator=g)).to(dtype)
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    assert torch.equal(ours(x), ref(x))
    xd = x.double()  # and the formula itself, in fp64
    want = w.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    assert (ours(x).double() - want).abs().max() <= (2e-2 if dtype == torch.bfloat16 else 1e-5) * want.abs().max()


def test_rope_scaling_next_to_a_different_rope_parameters_is_refused():
    """YaRN added as `rope_scaling` (Qwen's model-card recipe) to a config.json that transformers 5 wrote, so that
    also has `rope_parameters` {default}: transformers takes rope_scaling whole (YaRN), golong took the merge with
    rope_parameters winning (no YaRN) — a different network, silently. Disagreeing spellings now raise; agreeing
    ones still parse."""
    import copy

    from transformers import Qwen3MoeConfig

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    default = {"rope_type": "default", "rope_theta": 1e6}
    both = dict(QWEN3_30B_A3B, rope_parameters=default, rope_scaling=yarn)
    both.pop("rope_theta")
    assert Qwen3MoeConfig.from_dict(copy.deepcopy(both)).rope_parameters["rope_type"] == "yarn"  # it edits its input
    with pytest.raises(ConfigError, match="rope_scaling=.*rope_parameters=.* disagree on rope_theta "
                                          r"\(10000.0 against 1000000.0\), rope_type \(yarn against default\)"):
        ModelConfig.from_hf(both)
    top = dict(both, rope_theta=1e6)
    other = dict(top, rope_parameters={**yarn, "rope_theta": 1e6, "factor": 8.0})
    with pytest.raises(ConfigError, match=r"disagree on factor \(4.0 against 8.0\) \(each read on its own"):
        ModelConfig.from_hf(other)
    # a key on one side only: what transformers fills in for rope_scaling differs (it reads rope_scaling alone),
    # e.g. rope_theta without a top-level one (its default 10000), beta_fast (32), the original length
    half = dict(both, rope_parameters={**yarn, "rope_theta": 1e6})  # no top-level rope_theta
    assert Qwen3MoeConfig.from_dict(copy.deepcopy(half)).rope_parameters["rope_theta"] == 10000.0
    with pytest.raises(ConfigError, match=r"disagree on rope_theta \(10000.0 against 1000000.0\) \(each read on"):
        ModelConfig.from_hf(half)
    for extra in ({"beta_fast": 8}, {"original_max_position_embeddings": 16384}):
        with pytest.raises(ConfigError, match=rf"disagree on {next(iter(extra))} \(.* \(each read on its own"):
            ModelConfig.from_hf(dict(top, rope_parameters={**yarn, "rope_theta": 1e6, **extra}))
    same = ModelConfig.from_hf(dict(top, rope_parameters={**yarn, "rope_theta": 1e6}))
    assert same.rope_theta == 1e6 and same.rope_scaling.factor == 4.0
    assert ModelConfig.from_hf(dict(both, rope_scaling=None)).rope_scaling is None  # a null rope_scaling is absent


def test_a_directory_without_config_json_is_named_as_no_model(tmp_path):
    # was "[Errno 2] No such file or directory: '<dir>/config.json'"
    with pytest.raises(ConfigError, match=f"^{tmp_path} is not a Hugging Face model directory: it has no config.json$"):
        ModelConfig.from_hf(tmp_path)


def test_every_scratch_field_reaches_the_model_config_it_builds():
    """model.scratch is copied field by field into a Hugging Face config dict: each value must arrive as given
    (none left to the config class's default), and num_experts=0 is a dense qwen3 model."""
    import dataclasses

    from golong.build import model_config
    from golong.config import RunConfig, ScratchModelConfig

    # every value differs from both ScratchModelConfig's and ModelConfig's defaults
    moe = ScratchModelConfig(vocab_size=300, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                             num_key_value_heads=2, head_dim=8, intermediate_size=40, num_experts=5,
                             num_experts_per_tok=3, moe_intermediate_size=12, norm_topk_prob=False,
                             max_position_embeddings=4096, rope_theta=5e5, rms_norm_eps=1e-5,
                             tie_word_embeddings=False)
    cfg = RunConfig()
    for scratch, model_type in ((moe, "qwen3_moe"), (dataclasses.replace(moe, num_experts=0), "qwen3")):
        cfg.model.scratch = scratch
        got = model_config(cfg)
        assert got.model_type == model_type and got.is_moe == (scratch.num_experts > 0)
        moe_only = () if got.is_moe else ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")
        for f in dataclasses.fields(scratch):
            if f.name not in moe_only:
                assert getattr(got, f.name) == getattr(scratch, f.name), (model_type, f.name)
