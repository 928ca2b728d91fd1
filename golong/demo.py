"""`golong demo`: the whole pipeline on a CPU, from nothing, in a few minutes.

A tiny Qwen3-MoE is trained from scratch on the nine synthetic capability tasks: a short SFT
warm-up on reference answers, then GRPO with TMN-Reweight (torch rollouts, process-pool rewards,
dynamic sampling, FSDP2 over 2 gloo ranks, DCP checkpoints). Held-out prompts are scored after SFT
and after RL with the validation sampling settings. Writes into the output directory:

    metrics.jsonl     every SFT / RL step and validation
    summary.json      reward_after_sft, reward_after_rl, rl_minus_sft (prompt by prompt, with its standard error),
                      per-task rows, timings
    rollouts/         every step's responses and each validation's (val_step_<N>.jsonl)
    curves.png        per-task reward, entropy, logprob mismatch (golong plot)
    hf/               the final policy as a Hugging Face model (checked: transformers loads it)
    checkpoints/      the DCP training checkpoints
    eval/             `golong eval` results of this directory's checkpoints (removed by the next demo)

and prints a per-task table at the end. A later demo with the same output directory replaces these (and only
these), naming them first; a directory whose outputs the demo did not write (another run's) is refused, not emptied.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo-cpu.yaml"
# outputs of an earlier demo in the same directory (the demo always starts from scratch)
# (wandb_run_id too: a new demo is a new W&B run, not a resume of the last one)
# eval/: `golong eval` with this run_dir scored checkpoints the new demo deletes; vllm_model: rollout.engine=vllm
_OUTPUTS = ("metrics.jsonl", "summary.json", "curves.png", "checkpoints", "hf", "profile", "tb", "wandb_run_id",
            "rollouts", "config.yaml", "eval", "vllm_model")
# written into the output directory before training: its outputs are a demo's, which the next demo may replace
_MARKER = ".golong-demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg: Any, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)  # one core per rank: 2 ranks on 2 cores
    try:
        from golong.trainer import train

        out = train(cfg)
        results.put((rank, "ok", out["history"] if rank == 0 else None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise


def _launch(cfg: Any, world: int) -> list[dict[str, Any]]:
    """Run the trainer on `world` spawned gloo ranks; rank 0's validation history."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, cfg, results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    history, errors = None, []
    while not results.empty():
        rank, status, payload = results.get()
        if status == "error":
            errors.append(f"--- rank {rank} ---\n{payload}")
        elif rank == 0:
            history = payload
    if errors or history is None or any(p.exitcode for p in procs):
        detail = "\n".join(errors) or f"exit codes {[p.exitcode for p in procs]}"
        raise RuntimeError(f"demo training failed:\n{detail}")
    return history


def _verify_hf(hf_dir: Path, prompt_ids: list[int]) -> float:
    """Load the export with transformers and compare its logits with golong's on a prompt."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from golong.models import from_pretrained

    transformers.logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.tensor(prompt_ids)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        got = ours.logits(ours(ids, torch.tensor([0, len(ids)], dtype=torch.int32)))
    return float((got - ref).abs().max())


def _change(d: float) -> str:
    """A reward change as rich markup: green up, red down, plain when it shows as 0.000. Decided on the printed
    value: a float-rounding difference (-1e-17) is no regression, and "-0.000" would read as one."""
    d = round(d, 3) + 0.0  # + 0.0: -0.0 prints as +0.000
    return f"[{'green' if d > 0 else 'red' if d < 0 else 'white'}]{d:+.3f}"


def _stderr(x: float | None) -> str:
    return "" if x is None else f" ± {x:.3f}"


def _table(rows: list[dict[str, Any]], after_sft: float, after_rl: float, title: str,
           stderr: float | None = None) -> None:
    """rows: per task, after_sft / after_rl and (where the validations were paired) change_stderr; stderr: the
    overall change's."""
    from rich.table import Table

    from golong.data.check import print_table

    t = Table(title=title)
    for col, just in (("task", "left"), ("metric", "left"), ("after SFT", "right"), ("after RL", "right"),
                      ("change" if stderr is None else "change ± stderr", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        t.add_row(r["task"], r["metric"], f"{r['after_sft']:.3f}", f"{r['after_rl']:.3f}",
                  _change(r["after_rl"] - r["after_sft"]) + _stderr(r.get("change_stderr")))
    t.add_row("[bold]all", "", f"[bold]{after_sft:.3f}", f"[bold]{after_rl:.3f}",
              "[bold]" + _change(after_rl - after_sft) + _stderr(stderr))
    print_table(t)


def _paired_validations(dumps: Path, sft_step: int, rl_step: int) -> dict[str, Any] | None:
    """golong eval-compare of the two validations' dumps (RL - SFT prompt by prompt), or None without them
    (a config with logging.dump_rollouts off)."""
    from golong.eval_compare import compare, read_scores

    a, b = (dumps / f"val_step_{step:06d}.jsonl" for step in (sft_step, rl_step))
    return compare(read_scores(a), read_scores(b)) if a.is_file() and b.is_file() else None


def run_demo(out_dir: str | Path = "runs/demo", config: str | Path | None = None,
             overrides: list[str] | tuple[str, ...] = (), world_size: int = 2) -> dict[str, Any]:
    """Train, evaluate, export and plot; returns the summary (also written to out_dir/summary.json). Not the
    config's logging.run_dir: `golong train configs/demo-cpu.yaml` writes there, and the demo replaces what it
    finds in its directory."""
    from golong.config import ConfigError, load_config
    from golong.logger import get_logger

    log = get_logger()
    t_start = time.perf_counter()
    out = Path(out_dir)
    cfg = load_config(config or DEFAULT_CONFIG, [*overrides, f"logging.run_dir={out}", "checkpoint.resume=none"])
    if cfg.trainer.sft_steps <= 0 or not cfg.trainer.val_every:
        raise ConfigError("the demo needs trainer.sft_steps > 0 and trainer.val_every > 0")  # CLI: one line
    found = [name for name in _OUTPUTS if (out / name).exists()]
    if found and not (out / _MARKER).is_file() and not (out / "summary.json").is_file():
        # another run's directory (--out runs/my-run): the demo would delete its checkpoints and metrics
        raise FileExistsError(f"--out {out} holds {', '.join(found)} that golong demo did not write (a training run's "
                              "outputs?); the demo replaces these: choose another --out, or remove them")
    if found:  # replaced by design, but not without a word: what goes, before it goes
        log.info(f"golong demo: replacing the earlier demo's outputs in {out}: "
                 f"{', '.join(n + '/' if (out / n).is_dir() else n for n in found)}")
    for name in _OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("outputs of golong demo: the next demo with this --out replaces them\n")
    log.info(f"golong demo -> {out}: tiny Qwen3-MoE from scratch, {cfg.trainer.sft_steps} SFT steps, then "
             f"{cfg.trainer.total_steps} GRPO steps ({cfg.algo.adv_estimator}"
             f"{' + difficulty reweight' if cfg.algo.difficulty_reweight else ''}) on {world_size} gloo ranks")

    history = _launch(cfg, world_size)
    t_train = time.perf_counter() - t_start

    from golong.checkpoint import export_hf, latest_checkpoint
    from golong.data import build_prompts
    from golong.data.synthetic import generate
    from golong.plot import plot_run
    from golong.rewards import metric_for

    sft = next(h for h in history if h["step"] == 0)
    rl = max(history, key=lambda h: h["step"])
    prefix = "val/reward/task/"
    tasks = sorted(k[len(prefix):] for k in rl if k.startswith(prefix))
    rows = [{"task": t, "metric": metric_for(t), "after_sft": sft[prefix + t], "after_rl": rl[prefix + t]}
            for t in tasks]
    # the same held-out prompts scored twice: their difference has a paired standard error (golong eval-compare)
    paired = _paired_validations(out / "rollouts", sft["step"], rl["step"])
    if paired is not None:
        for r in rows:
            r["change_stderr"] = paired["tasks"][r["task"]]["diff_stderr"]

    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None
    hf_dir = export_hf(ckpt, out / "hf")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    held_out = generate(1, cfg.data.synthetic_context_tokens, seed=cfg.data.seed + 7919)
    prompt = build_prompts(held_out, tok, cfg.data.max_prompt_tokens, split="export check")[0].input_ids.tolist()
    hf_diff = _verify_hf(hf_dir, prompt)
    png = plot_run(out)

    summary = {
        "reward_after_sft": sft["val/reward/mean"],
        "reward_after_rl": rl["val/reward/mean"],
        "rl_improved": rl["val/reward/mean"] > sft["val/reward/mean"],
        "rl_minus_sft": None if paired is None else {k: paired[k] for k in ("prompts", "diff", "diff_stderr",
                                                                           "b_higher", "equal", "b_lower")},
        "per_task": rows,
        "held_out_prompts": cfg.data.synthetic_val_n,
        "sft_steps": cfg.trainer.sft_steps,
        "rl_steps": rl["step"],
        "world_size": world_size,
        "validation": {"temperature": cfg.rollout.val_temperature, "top_p": cfg.rollout.val_top_p,
                       "responses_per_prompt": cfg.rollout.val_n},
        "hf_export": {"path": str(hf_dir), "transformers_max_abs_logit_diff": hf_diff},
        "plot": str(png),
        "seconds": {"train": round(t_train, 1), "total": round(time.perf_counter() - t_start, 1)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _table(rows, summary["reward_after_sft"], summary["reward_after_rl"],
           f"held-out reward ({cfg.data.synthetic_val_n} prompts, T={cfg.rollout.val_temperature}, "
           f"top-p {cfg.rollout.val_top_p})", None if paired is None else paired["diff_stderr"])
    if paired is not None:
        print(f"prompt by prompt, RL scored {paired['b_higher']} held-out prompts higher than SFT, {paired['equal']} "
              f"equal, {paired['b_lower']} lower (golong eval-compare {out / 'rollouts'}/val_step_{sft['step']:06d}"
              f".jsonl {out / 'rollouts'}/val_step_{rl['step']:06d}.jsonl)")
    print(f"transformers loads {hf_dir}: max |logit diff| vs golong = {hf_diff:.2e}")
    print(f"wrote {out / 'metrics.jsonl'}, {out / 'summary.json'}, {png}, {hf_dir}")
    print(f"demo finished in {summary['seconds']['total']:.0f}s "
          f"(reward {summary['reward_after_sft']:.3f} after SFT -> {summary['reward_after_rl']:.3f} after RL)")
    return summary
