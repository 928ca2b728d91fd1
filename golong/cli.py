"""The `golong` command: train, eval, eval-compare, demo, export, plot, data (synth, check, import), plan.

    torchrun --nproc_per_node 8 -m golong train configs/qwen3-4b-tmn.yaml optim.lr=2e-6
    golong eval configs/qwen3-4b-tmn.yaml --checkpoint runs/qwen3-4b-tmn/checkpoints/step_000100
    golong train configs/demo-cpu.yaml --dry-run
    golong demo --out runs/demo
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from golong.config import ConfigError, config_warnings, load_config, run_problems, to_yaml
from golong.data.benchmarks import BENCHMARKS
from golong.data.records import RecordError
from golong.rewards.function import RewardFunctionError
from golong.rewards.judge import JudgeError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see configs/)")
    # default=[]: argparse lists a "*" positional without a default among the required arguments
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="dotted overrides, e.g. algo.adv_estimator=tmn_grpo optim.lr=2e-6")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="golong", description="Long-context RL (GRPO / TMN-Reweight) for Qwen3 and Qwen3-MoE.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train from a config (launch with torchrun for several ranks)",
                       description="Run GRPO training. Launch form: "
                                   "torchrun --nproc_per_node N -m golong train CONFIG key=value ...")
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    p.set_defaults(subparser=p)

    p = sub.add_parser("eval", help="score a model or a training checkpoint on the config's validation prompts",
                       description="Generate rollout.val_n responses per validation prompt (data.val_files or "
                                   "data.synthetic_val_n; rollout.val_temperature / val_top_p; the seeds of training's "
                                   "validation) and score them: per-task mean reward ± stderr, pass@k, best@n to "
                                   "OUT/eval.json, every response to OUT/responses.jsonl; each batch of prompts is "
                                   "saved as it is done, and a rerun resumes there. Launch form for several "
                                   "ranks: torchrun --nproc_per_node N -m golong eval CONFIG ...")
    _add_config_args(p)
    p.add_argument("--checkpoint", default=None,
                   help="training checkpoint directory whose weights to score (default: the config's model, "
                        "model.path or the scratch init)")
    p.add_argument("--out", default=None, help="output directory (default: LOGGING.RUN_DIR/eval/<checkpoint name, "
                                               "or 'model'>)")
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="generate and save N prompts' responses at a time to OUT/eval.partial.jsonl, which a rerun "
                        "with the same settings resumes from (default: batches of at most 8M context tokens per rank, "
                        "prompt + max response, times rollout.val_n; 0: all at once, nothing saved)")
    p.add_argument("--by", action="append", default=[], metavar="KEY",
                   help="also report per group of prompts: by the records' extra_info KEY (e.g. difficulty, length "
                        "of LongBench-v2) or by prompt_tokens (token-count bins <4K, 4K-8K, ..., 512K-1M, >=1M, as "
                        "MRCR reports); each response row of responses.jsonl names its prompt's group under KEY (as "
                        "under every extra_info key holding a number or short text), which golong eval-compare --by "
                        "reads; repeatable")
    p.set_defaults(subparser=p)

    p = sub.add_parser("eval-compare", help="compare two evals of the same prompts: reward difference ± its stderr",
                       description="Read two golong eval directories (or their responses.jsonl or eval.json) of the "
                                   "same prompts and print, per task and overall, each one's mean reward and the mean "
                                   "over prompts of the difference B - A of the prompts' mean scores, with its "
                                   "standard error (paired: the noise the two share, from how hard each prompt is, "
                                   "cancels) and how many prompts B scored above, equal to and below A.")
    p.add_argument("a", help="the first eval (A): an eval directory, its responses.jsonl or its eval.json")
    p.add_argument("b", help="the second eval (B)")
    p.add_argument("--by", action="append", default=[], metavar="KEY",
                   help="also per group of prompts: prompt_tokens (token-count bins), or a record key the response "
                        "rows are labelled with (extra_info keys holding numbers or short text, and golong eval's "
                        "--by keys); repeatable")
    p.add_argument("--common", action="store_true",
                   help="compare the prompts both evals hold (e.g. evals at two context lengths with "
                        "data.overflow=drop); the others are counted and left out")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers to FILE as JSON")
    p.set_defaults(subparser=p)

    p = sub.add_parser("demo", help="CPU demo: tiny Qwen3-MoE, SFT warm-up then GRPO+TMN-Reweight on 2 ranks",
                       description="Train a tiny Qwen3-MoE from scratch on the 9 synthetic tasks on this CPU "
                                   "(no download): SFT warm-up, then GRPO with TMN-Reweight on 2 gloo ranks. "
                                   "Writes metrics.jsonl, summary.json, a plot and an exported HF model. An earlier "
                                   "demo's outputs in --out (checkpoints/, hf/, eval/, metrics, summary) are named, "
                                   "then replaced; a directory holding another run's outputs is refused.")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--config", default=None, help="demo config (default: configs/demo-cpu.yaml)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="overrides applied to the demo config")
    p.set_defaults(subparser=p)

    p = sub.add_parser("export", help="write a Hugging Face safetensors model from a training checkpoint",
                       description="Convert a DCP training checkpoint into a Hugging Face directory "
                                   "(config.json + sharded safetensors) that transformers and vLLM load.")
    p.add_argument("checkpoint", help="checkpoint directory (e.g. runs/x/checkpoints/step_000100)")
    p.add_argument("out", help="output directory")
    p.set_defaults(subparser=p)

    p = sub.add_parser("plot", help="plot per-task reward, entropy and logprob mismatch of a run to PNG",
                       description="Read RUN_DIR/metrics.jsonl and draw curves to RUN_DIR/curves.png.")
    p.add_argument("run_dir", help="the run directory (its metrics.jsonl may be given instead)")
    p.add_argument("--out", default=None, help="PNG path, or a directory for curves.png in it (default: "
                                               "RUN_DIR/curves.png); another suffix (.pdf, .svg) picks that format")
    p.set_defaults(subparser=p)

    p = sub.add_parser("data", help="dataset tools (synthetic generator, data check, benchmark import)",
                       description="Dataset tools.")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = dsub.add_parser("synth", help="write a synthetic dataset of the 9 capability tasks",
                        description="Write GoLongRL-format records of the 9 synthetic capability tasks.")
    s.add_argument("--out", required=True, help="output .jsonl or .parquet")
    s.add_argument("--n", type=int, required=True, help="number of records")
    s.add_argument("--context-tokens", type=int, default=1024,
                   help="approximate context length per record (default: 1024)")
    s.add_argument("--seed", type=int, default=0, help="(default: 0)")
    s.add_argument("--tasks", default=None, help="comma-separated task types (default: all nine)")
    s.set_defaults(subparser=s)
    s = dsub.add_parser("check", help="what training would see of a config's data, per task",
                        description="Read the config's training and validation records as a run does (validated: a "
                                    "bad record is named by file and line), chat-template and tokenize them, and "
                                    "print per task the records, the prompts kept, truncated and dropped at "
                                    "data.max_prompt_tokens, and the kept prompts' token lengths. The tokenized "
                                    "prompts go to the run's prompt cache (data.prompt_cache), which training then "
                                    "reads instead of tokenizing again.")
    _add_config_args(s)
    s.add_argument("--val-only", action="store_true",
                   help="the validation records only (data.val_files, else data.synthetic_val_n), as golong eval "
                        "reads them: no training data is needed (e.g. a benchmark from golong data import)")
    s.add_argument("--score-answers", action="store_true",
                   help="also score each record's reference answer as training scores a response (the run's reward "
                        "function or golong's metrics): per task the mean and how many score below 1, and the first "
                        "such record")
    s.set_defaults(subparser=s)

    s = dsub.add_parser("import", help="convert a long-context benchmark of the model card (LongBench-v2, MRCR, "
                                       "DocMath, Frames, LongBench v1 QA, CorpusQA) into golong records",
                        description="Write the rows of a benchmark's source files as golong records scored by the "
                                    "benchmark's own metric, for golong eval (data.val_files). longbench-v2: "
                                    "THUDM/LongBench-v2's data.json, scored by 'The correct answer is (X)'; mrcr: "
                                    "openai/mrcr's parquet files, scored by OpenAI's grade (the random prefix, then "
                                    "difflib's ratio); docmath: yale-nlp/DocMath-Eval's testmini files, scored by the "
                                    "number in 'Therefore, the answer is N' as GoLongRL's DocMath eval rules it; "
                                    "frames: iic/frames' test.jsonl (Frames with its Wikipedia articles), scored by "
                                    "cover exact match as GoLongRL's Frames eval; lbv1qa: THUDM/LongBench's QA "
                                    "subsets (data/<subset>.jsonl), scored by QA F1; corpusqa: CorpusQA's files, "
                                    "scored by exact match. The last four take a judge model (judge.model): GoLongRL "
                                    "scores LongBench v1 QA and CorpusQA by the judge alone. A bad row is named by "
                                    "file and line / item / row.")
    s.add_argument("benchmark", choices=list(BENCHMARKS), help="which benchmark the files hold")
    s.add_argument("sources", nargs="+", help="its files (.json, .jsonl or .parquet), read in order")
    s.add_argument("--out", required=True, help="output .jsonl (or .json: JSON Lines) or .parquet; never a source")
    s.add_argument("--limit", type=int, default=None, help="convert the first N rows only (over the files in order)")
    s.add_argument("--template", default=None,
                   help="a prompt template file (default: golong's wording of the benchmark's prompt). longbench-v2: "
                        "LongBench-v2's placeholders $DOC$, $Q$, $C_A$ .. $C_D$ (e.g. LongBench's prompts/0shot.txt); "
                        "docmath, frames and lbv1qa: $DOC$ and $Q$ (QwenLong-L1's DocMath prompt)")
    s.set_defaults(subparser=s)

    p = sub.add_parser("plan", help="predict per-GPU memory and step time of a config before launching",
                       description="Predict per-GPU peak memory, FLOPs and a roofline step time.")
    _add_config_args(p)
    p.add_argument("--gpus", type=int, required=True, help="total number of GPUs")
    p.add_argument("--gpu-mem", type=float, default=141.0, help="memory per GPU in GiB (default: 141, an H200's; "
                                                                "the roofline assumes H100 / H200 speeds)")
    p.set_defaults(subparser=p)
    return parser


def _error(e: Exception) -> None:
    from golong.logger import rank

    who = f"rank {rank()}: " if rank() else ""  # every rank of a launch meets the same bad input
    sys.stderr.write(f"golong: error: {who}{e}\n")  # one write: lines of several ranks do not interleave


def _load(args: argparse.Namespace):  # noqa: ANN202
    return load_config(args.config, args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after flags (`train CFG --dry-run a=1`): collect stragglers.
    args, extra = parser.parse_known_args(argv)
    # a word without "=" after a flag (`train CFG --dry-run optim.lr`) is a malformed override:
    # load_config names it, rather than argparse calling it an unrecognized argument
    stray = [e for e in extra if e.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        args.subparser.error(f"unrecognized arguments: {' '.join(stray or extra)}")  # with that command's usage
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "train":
            cfg = _load(args)
            problems = run_problems(cfg)
            if cfg.model.path is None:  # a scratch architecture no model can have: an error on a dry run too
                from golong.build import model_config

                model_config(cfg)
            if args.dry_run:
                print(to_yaml(cfg), end="")
                for line in config_warnings(cfg) + problems:
                    print(f"golong: warning: {line}", file=sys.stderr)
                return 0
            if problems:
                raise ConfigError(problems[0])
            from golong.trainer import train

            train(cfg)
        elif args.command == "eval":
            cfg = _load(args)
            problems = run_problems(cfg, for_eval=True)
            if problems and args.checkpoint and problems[0].startswith(("model.path", "model.tokenizer")):
                # the run's starting model gives the architecture and tokenizer a checkpoint's weights go into
                problems[0] += (f"; without it, export the checkpoint (golong export {args.checkpoint} DIR) and "
                                "evaluate the export: golong eval CONFIG model.path=DIR")
            if problems:
                raise ConfigError(problems[0])
            if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
                raise ConfigError(f"--out {args.out} exists and is not a directory; name a directory for eval.json "
                                  "and responses.jsonl")
            from golong.evaluate import evaluate

            if args.save_every is not None and args.save_every < 0:
                args.subparser.error("--save-every must be >= 0")
            evaluate(cfg, args.checkpoint, args.out, by=args.by, save_every=args.save_every)
        elif args.command == "eval-compare":
            import json

            from golong.eval_compare import compare, print_comparison, read_scores

            result = compare(read_scores(args.a), read_scores(args.b), by=args.by, common=args.common)
            print_comparison(result)
            if args.json:
                tmp = Path(f"{args.json}.tmp")  # written whole or not at all
                tmp.write_text(json.dumps(result, indent=2) + "\n")
                tmp.replace(args.json)
                print(f"wrote {args.json}")
        elif args.command == "demo":
            from golong.demo import run_demo

            run_demo(args.out, config=args.config, overrides=args.overrides)
        elif args.command == "export":
            from golong.checkpoint import export_hf

            print(export_hf(args.checkpoint, args.out))
        elif args.command == "plot":
            from golong.plot import plot_run

            print(plot_run(args.run_dir, args.out))
        elif args.command == "data" and args.data_command == "check":
            from golong.data.check import check_data

            cfg = _load(args)
            # model / tokenizer / validation paths (training's: below); no rollout engine
            problems = run_problems(cfg, for_eval=True, engine=False)
            if problems:
                raise ConfigError(problems[0])
            check_data(cfg, answers=args.score_answers, train=not args.val_only)
        elif args.command == "data" and args.data_command == "import":
            from golong.data.benchmarks import import_benchmark
            from golong.data.check import print_task_counts

            template = None
            if args.template is not None:
                try:
                    template = Path(args.template).read_text(encoding="utf-8")
                except OSError as e:
                    args.subparser.error(f"--template: {e}")
                except UnicodeDecodeError as e:
                    args.subparser.error(f"--template {args.template}: not UTF-8 text (byte {e.start})")
            records = import_benchmark(args.benchmark, args.sources, args.out, limit=args.limit, template=template)
            print_task_counts(records, f"golong data import {args.benchmark}: {len(records)} records")
            print(args.out)
        elif args.command == "data":
            from golong.data.check import print_task_counts
            from golong.data.records import write_records
            from golong.data.synthetic import generate

            if args.n < 1 or args.context_tokens < 1:
                args.subparser.error("--n and --context-tokens must be >= 1")
            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
            records = generate(args.n, args.context_tokens, seed=args.seed, tasks=tasks)
            path = write_records(records, args.out)
            print_task_counts(records, f"golong data synth: {args.n} records")
            print(path)
        elif args.command == "plan":
            from golong.plan import plan_main

            if args.gpus < 1 or not (0 < args.gpu_mem < math.inf):
                args.subparser.error("--gpus must be >= 1 and --gpu-mem a number of GiB > 0")
            cfg = _load(args)
            for line in config_warnings(cfg):
                print(f"golong: warning: {line}", file=sys.stderr)
            return plan_main(cfg, gpus=args.gpus, gpu_mem_gib=args.gpu_mem)
    except (RewardFunctionError, JudgeError) as e:  # the user's function (its traceback in the message), the judge
        from golong.logger import rank

        if rank() == 0:  # every rank raises it together
            _error(e)
        return 1
    except (ConfigError, RecordError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError) as e:
        # bad input (config, dataset records, paths): one line, no traceback
        _error(e)
        return 2
    except ValueError as e:
        if args.command not in ("data", "plot"):  # data synth: unknown task names, unsupported formats; plot: --out
            raise
        _error(e)
        return 2
    except OSError as e:  # writing a file the user named (a full disk, a read-only filesystem); a run's: traceback
        from golong.checkpoint import CheckpointWriteError  # (imported here: torch.distributed.checkpoint is slow)

        if isinstance(e, CheckpointWriteError):  # a run's checkpoint on a full disk: one line naming what stands
            _error(e)
            return 1
        if args.command not in ("data", "plot", "export", "eval-compare"):
            raise
        _error(e)
        return 2
    except KeyboardInterrupt:  # Ctrl-C (golong train says what it kept itself): one line, not a traceback
        left = {"check": "the prompt cache keeps only the splits written whole",
                "synth": f"{getattr(args, 'out', '')} may be partly written",
                "export": f"{getattr(args, 'out', '')} may hold a partial export",
                "eval": "the batches of prompts done are saved in OUT/eval.partial.jsonl (unless --save-every 0): "
                        "the same command resumes after them",
                "import": "the output file was not written"}.get(
            getattr(args, "data_command", None) or args.command)
        sys.stderr.write(f"golong: interrupted{f'; {left}' if left else ''}\n")
        return 130  # 128 + SIGINT, as a shell reports it (and golong train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
