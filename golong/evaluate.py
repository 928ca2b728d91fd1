"""`golong eval`: a model's or a checkpoint's validation rollouts, scored and written to eval.json and
responses.jsonl, with the table it prints."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from golong.config import RunConfig, prompt_cache_dir, to_dict
from golong.eval_groups import breakdown, sample_fields
from golong.logger import get_logger, write_jsonl
from golong.rewards.pass_at_k import k_values
from golong.trainer import Trainer

log = get_logger()


def evaluate(cfg: RunConfig, checkpoint: str | Path | None = None, out_dir: str | Path | None = None,
             by: Sequence[str] = (), save_every: int | None = None) -> dict[str, Any]:
    """Entry point of `golong eval`: the validation rollouts (data.val_files or data.synthetic_val_n, rollout.val_*
    sampling, the same seeds as training's validation) of the config's model (model.path, else the scratch init)
    or of a training checkpoint's weights. Writes OUT_DIR/eval.json (per-task mean reward ± stderr, pass@k, best@n,
    worst@n, std@n, counts; with `by`, the same per group of prompts under each key, see `breakdown`, and each key's
    unweighted mean over its groups in `by_mean`: on rank 0) and
    OUT_DIR/responses.jsonl (every response, its task and score); returns the eval.json content. The prompts go
    `save_every` at a time (default: by context tokens, golong.eval_saved.batch_starts; 0: all at once, nothing
    saved), each batch saved to OUT_DIR/eval.partial.jsonl, which a rerun with the same settings resumes from
    (golong.eval_saved)."""
    import json

    from golong.checkpoint import checkpoint_problem
    from golong.data.check import task_metrics

    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and (problem := checkpoint_problem(ckpt)):  # before the model is built
        raise FileNotFoundError(f"--checkpoint {problem}")
    out = Path(out_dir) if out_dir is not None else \
        Path(cfg.logging.run_dir) / "eval" / (ckpt.name if ckpt else "model")
    # the training run's prompt cache, not one per eval directory that no other eval would read
    cache = prompt_cache_dir(cfg)
    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, run_dir=str(out), wandb=False,
                                                               tensorboard=False),
                              data=dataclasses.replace(cfg.data, prompt_cache="none" if cache is None else str(cache)))
    trainer = None
    try:
        trainer = Trainer(cfg, eval_only=True, eval_by=by)
        step = 0
        if ckpt is not None:
            step = int(trainer.ckpt.load(ckpt, trainer.model, None, resume=False).get("step", 0))
            trainer.engine.sync_weights(trainer.model)
            log.info(f"eval: weights of {ckpt} (step {step})")
        val_records = trainer.val_record_tasks
        dropped = val_records.total() - len(trainer.val_prompts)
        responses: list[dict[str, Any]] = []  # filled on rank 0
        from golong.eval_saved import batch_starts, fingerprint

        rc = cfg.rollout
        starts = batch_starts([len(p.input_ids) for p in trainer.val_prompts], rc.max_response_tokens, rc.val_n,
                              trainer.world, save_every)
        saved, fp = (out / "eval.partial.jsonl" if save_every != 0 else None), ""
        if saved is not None and trainer.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            # what the responses and scores depend on: the config without where it writes, how it checkpoints and
            # how it spreads over ranks (the seeds follow each request's place in the set, not its rank)
            settings = {k: v for k, v in to_dict(cfg).items() if k not in ("logging", "profile", "parallel",
                                                                             "checkpoint")}
            settings["data"] = {k: v for k, v in settings["data"].items() if k != "prompt_cache"}
            fp = fingerprint(trainer.val_prompts, settings, ckpt)
        metrics = trainer.validate(step, responses, starts=starts, saved=saved, fingerprint=fp)
        prompts = Counter(p.record.task for p in trainer.val_prompts)
        truncated = Counter(p.record.task for p in trainer.val_prompts if p.truncated)
        metric = task_metrics((p.record for p in trainer.val_prompts), cfg.rollout.reward_function)
        n = cfg.rollout.val_n

        def samples(prefix: str, suffix: str = "") -> dict[str, Any]:  # see golong.eval_groups.sample_fields
            return sample_fields(lambda name: metrics.get(f"{prefix}{name}{suffix}"), n)

        result = {"checkpoint": str(ckpt) if ckpt else None, "model": cfg.model.path, "step": step,
                  "prompts": len(trainer.val_prompts), "responses_per_prompt": n,
                  # the records the prompts come from: those left out or cut at data.max_prompt_tokens
                  "records": val_records.total(), "dropped": dropped, "truncated": sum(truncated.values()),
                  "overflow": cfg.data.overflow, "max_prompt_tokens": cfg.data.max_prompt_tokens,
                  # tasks none of whose records fit: their record counts (they have no row in `tasks`)
                  "tasks_dropped": {t: c for t, c in sorted(val_records.items()) if t not in prompts},
                  "temperature": cfg.rollout.val_temperature, "top_p": cfg.rollout.val_top_p,
                  # what else the scores depend on (golong eval-compare warns where two evals differ in them)
                  "max_response_tokens": cfg.rollout.max_response_tokens, "require_think": cfg.rollout.require_think,
                  "reward_function": _function_id(cfg.rollout.reward_function),
                  # what the reward function is called with (golong's metrics read none)
                  "reward_kwargs": dict(cfg.rollout.reward_kwargs) if cfg.rollout.reward_function else None,
                  "reward_mean": metrics["val/reward/mean"], **samples("val/"),
                  # None: rollout.require_think off, or a reward function of the user's own (no format gate)
                  "format_error_frac": metrics.get("val/format_error_frac"),
                  # judge.model: the answers it judged, those it judged the reference's, those it failed on, and the
                  # scores its verdicts raised and lowered
                  "judge": None if "val/judge/asked" not in metrics else
                  {"model": cfg.judge.model, "url": cfg.judge.url,
                   **{k: int(metrics[f"val/judge/{k}"]) for k in ("asked", "yes", "failed", "raised", "lowered")}},
                  "function_errors": None if "val/reward/function_errors" not in metrics else  # None: no function
                  int(metrics["val/reward/function_errors"]),
                  # golong's metrics that ran out of time or memory (scored 0); None: a reward function scored
                  "scoring_failures": None if "val/reward/scoring_failures" not in metrics else
                  int(metrics["val/reward/scoring_failures"]),
                  # the means of the other numbers the reward function's dict results held
                  "reward_extras": {k.removeprefix("val/reward/extra/"): v for k, v in metrics.items()
                                    if k.startswith("val/reward/extra/")},
                  "tasks": {t: {"metric": metric[t], "records": val_records[t],
                                "dropped": val_records[t] - prompts[t], "truncated": truncated[t],
                                "responses": prompts[t] * n,
                                "reward_mean": metrics[f"val/reward/task/{t}"], **samples("val/", f"/task/{t}"),
                                **({"function_errors": int(metrics.get(f"val/reward/function_errors/task/{t}", 0))}
                                   if cfg.rollout.reward_function else {})} for t in sorted(prompts)}}
        if trainer.rank == 0:
            if by:
                result["by"] = {key: breakdown(key, trainer.val_prompts, responses, n) for key in dict.fromkeys(by)}
                # each key's unweighted mean over its groups (the model card's LBV1-QA: the mean of its subsets')
                result["by_mean"] = {key: sum(g["reward_mean"] for g in groups.values()) / len(groups)
                                     for key, groups in result["by"].items() if groups}
            out.mkdir(parents=True, exist_ok=True)
            write_jsonl(out / "responses.jsonl", responses)
            # eval.json last and by rename: where it exists, both files are whole
            (out / "eval.json.tmp").write_text(json.dumps(result, indent=2) + "\n")
            os.replace(out / "eval.json.tmp", out / "eval.json")
            if saved is not None:  # eval.json and responses.jsonl hold it all now
                saved.unlink(missing_ok=True)
            _print_eval(result, out)
        return result
    finally:
        if trainer is not None:
            trainer.close()
        if dist.is_initialized() and cfg.rollout.engine != "vllm":
            dist.destroy_process_group()


def _function_id(spec: str) -> str | None:
    """rollout.reward_function with the sha1 of its file's code ("path[:name] @ sha1[:12]"), None without one: two
    evals of one path with other code in it scored differently."""
    if not spec:
        return None
    from golong.rewards.function import code_sha1

    return f"{spec} @ {code_sha1(spec)[:12]}"


def _print_eval(result: dict[str, Any], out: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    from golong.data.check import print_table

    # names from the data and paths are text, not rich markup ("[/x]" would raise, "[bold]x" print as x)
    title = f"eval: {escape(str(result['checkpoint'] or result['model'] or 'scratch model'))}, {result['prompts']} " \
            f"prompts x {result['responses_per_prompt']} (T={result['temperature']}, top-p {result['top_p']})"
    table = Table(title=title)
    failures = result.get("function_errors") is not None  # a reward function of the user's own: its failures
    n = result["responses_per_prompt"]
    ks = sorted({1, n})  # pass@1 and pass@n; eval.json holds every k

    def samples(row: dict[str, Any]) -> list[str]:
        return [f"{row['pass_at_k'][str(k)]:.3f}" for k in ks] + ([f"{row['best_of_n']:.3f}"] if n > 1 else [])

    def reward(row: dict[str, Any]) -> str:  # the mean, ± its standard error over prompts where there are several
        stderr = row.get("reward_stderr")
        return f"{row['reward_mean']:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")

    columns = [("task", "left"), ("metric", "left"), ("responses", "right"), ("reward ± stderr", "right")]
    columns += [(f"pass@{k}", "right") for k in ks] + ([(f"best@{n}", "right")] if n > 1 else [])
    for col, justify in columns + ([("function errors", "right")] if failures else []):
        table.add_column(col, justify=justify)
    for task, row in result["tasks"].items():
        table.add_row(escape(task), row["metric"], str(row["responses"]), reward(row), *samples(row),
                      *([str(row["function_errors"])] if failures else []))
    table.add_row("all", "", str(sum(r["responses"] for r in result["tasks"].values())),
                  reward(result), *samples(result),
                  *([str(result["function_errors"])] if failures else []))
    print_table(table)  # unwrapped where piped: no truncated task names
    for key, groups in result.get("by", {}).items():
        table = Table(title=f"by {escape(key)}")
        for col, justify in [(escape(key), "left"), ("prompts", "right"), ("responses", "right"), columns[3]] + \
                columns[4:]:
            table.add_column(col, justify=justify)
        for label, row in groups.items():
            table.add_row(escape(label), str(row["prompts"]), str(row["responses"]), reward(row), *samples(row))
        if len(groups) > 1 and key in result.get("by_mean", {}):
            table.add_row("(mean of groups)", "", "", f"{result['by_mean'][key]:.3f}", *[""] * (len(columns) - 4))
        print_table(table)
    if len(k_values(n)) > len(ks):
        print(f"pass@k for k = {', '.join(map(str, k_values(n)))}: pass_at_k in eval.json")
    cut = [f"{result[k]} {k}" for k in ("dropped", "truncated") if result.get(k)]
    if cut:  # the score covers a part of the data: say which
        print(f"{result['prompts']} prompts from {result['records']} records: {' and '.join(cut)} at "
              f"data.max_prompt_tokens={result['max_prompt_tokens']} (data.overflow={result['overflow']}); per task: "
              "records, dropped, truncated in eval.json")
    if result.get("tasks_dropped"):
        gone = result["tasks_dropped"]
        print("no prompt left of task(s) " + ", ".join(f"{t} ({c} records)" for t, c in gone.items()))
    if result.get("format_error_frac"):
        print(f"{result['format_error_frac']:.1%} of the responses failed the format gate (rollout.require_think) "
              "and scored 0")
    if failures and result["function_errors"]:
        count = result["function_errors"]
        print(f"the reward function failed on {count} response{'s' if count != 1 else ''}, which scored 0 (each "
              "one's error: reward_error in responses.jsonl)")
    if judge := result.get("judge"):
        print(f"judge {judge['model']}: {judge['asked']} answers judged, {judge['yes']} the reference's; its verdicts "
              f"raised {judge['raised']} scores and lowered {judge['lowered']} (DocMath, Frames: max(rule score, "
              f"verdict); LongBench v1 QA, CorpusQA: the verdict); {judge['failed']} failed, their rule scores stand "
              "(each response's verdict: judge in responses.jsonl)")
    print(f"wrote {out / 'eval.json'} and {out / 'responses.jsonl'}")
