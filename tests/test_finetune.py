"""`factorconv finetune`: distillation healing of tiny converted models on CPU.

Loss goes down, only the chosen weights move, LoRA saves a merged model that loads, an interrupted run resumed
from its checkpoint equals an uninterrupted one, two processes stay in sync on disjoint data, the gradient norm of
FSDP2-sharded gradients is logged as one global number, bad input gets one line. The real-weights healing test
(stories260K) lives in test_finetune_real.py.
"""

import json
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import VOCAB, random_ids
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from factorconv.cli import main
from factorconv.finetune import FinetuneOptions, finetune
from factorconv.finetune import data as data_lib
from factorconv.finetune import loop
from factorconv.finetune.checkpoints import CHECKPOINTS
from factorconv.finetune.metrics import METRICS_FILE, TIMING_KEYS
from factorconv.finetune.output import SUMMARY_FILE
from factorconv.finetune.options import default_lr
from factorconv.finetune.schedule import lr_at

SEQ = 32


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    """A short token stream with structure (repeated phrases), so that there is something to learn."""
    gen = torch.Generator().manual_seed(7)
    phrases = torch.randint(3, VOCAB, (12, 16), generator=gen)
    order = torch.randint(0, 12, (160,), generator=gen)
    path = tmp_path_factory.mktemp("ftdata") / "tokens.npy"
    np.save(path, phrases[order].flatten().numpy().astype(np.uint16))  # 2,560 tokens = 80 blocks of 32
    return path


@pytest.fixture(scope="module")
def tpa(converted):
    """stories-like GQA source (8 heads, 2 KV heads) converted to TPA R_K = R_V = 1: far from exact."""
    return converted("llama_gqa", rank_k=1, rank_v=1)


def options(model, output, data, **kwargs) -> FinetuneOptions:
    base = dict(model=str(model), output=output, data=[str(data)], seq_len=SEQ, batch_size=4, lr=3e-3)
    return FinetuneOptions(**{**base, **kwargs})


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def run(*args: str):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


# --- training ------------------------------------------------------------------------------------------------------


def test_loss_decreases_and_output_is_a_conversion_output(tpa, tokens_file, tmp_path):
    out = tmp_path / "healed"
    result = run("finetune", tpa, out, "--data", tokens_file, "--steps", 24, "--seq-len", SEQ, "--batch-size", 4,
                 "--lr", "3e-3", "--eval-every", 12)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out}: 24 steps, 3,072 tokens; eval perplexity")
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(25))
    assert np.mean([r["kl"] for r in train[-4:]]) < 0.7 * np.mean([r["kl"] for r in train[:4]])
    evals = [r["eval_ppl"] for r in rows if "eval_ppl" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]  # before, step 12, step 24
    assert rows[0]["teacher_eval_ppl"] < evals[0]
    assert all(set(r) >= {"loss", "kl", "ce", "lr", "tokens_per_s", "grad_norm"} for r in train)

    # Written like a conversion output: loads with the Auto classes, modeling files, tokenizer, card, recipe.
    for name in ("config.json", "modeling_factorconv.py", "configuration_factorconv.py", "tokenizer.json",
                 "factorconv_recipe.yaml", "factorconv_report.json", "README.md", "finetune_curves.png", SUMMARY_FILE):
        assert (out / name).is_file(), name
    assert not list(out.glob(".model-partial-*"))
    assert json.loads((out / "config.json").read_text()) == json.loads((tpa / "config.json").read_text())
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["tokens"] == 24 * 4 * SEQ and summary["eval"]["after_ppl"] == pytest.approx(evals[-1])
    assert summary["replicas_identical"] and summary["mixed_precision"] == "no"  # fp32 on CPU
    card = (out / "README.md").read_text()
    assert "# healed" in card and "## Fine-tuning" in card and "| fine-tuning tokens |  |  | 3,072 |" in card
    assert f"{summary['eval']['after_ppl']:.4g}" in card and "tokens.npy (last 4 blocks, held out)" in card
    recipe = (out / "factorconv_recipe.yaml").read_text()
    assert "convert:" in recipe and "finetune:" in recipe
    report = json.loads((out / "factorconv_report.json").read_text())
    assert report["finetune"]["steps"] == 24 and "layers" in report
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids(1, 12, seed=3)
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize(
    "trainable, expected",
    [
        ("attention", lambda n: ".self_attn." in n),
        ("attention+norms", lambda n: ".self_attn." in n or "norm" in n),
        ("all", lambda n: True),
    ],
)
def test_only_chosen_parameters_change(tpa, tokens_file, tmp_path, trainable, expected):
    out = finetune(options(tpa, tmp_path / "o", tokens_file, steps=3, trainable=trainable), progress=False)
    before, after = weights(tpa), weights(out)
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if expected(n)}, sorted(changed ^ {n for n in before if expected(n)})


def test_weights_outside_attention_take_their_own_lr(tpa, tokens_file, tmp_path):
    """One Adam step moves every weight with a gradient by the group's lr (m / √v = ±1 at step 1): the attention
    by --lr, the rest by --lr × outside_lr_ratio."""
    out = finetune(options(tpa, tmp_path / "o", tokens_file, steps=1, warmup=0, lr=1e-2, trainable="all",
                           outside_lr_ratio=0.1), progress=False)
    before, after = weights(tpa), weights(out)
    step = {name: (after[name] - before[name]).abs().max().item() for name in before}
    attention = [v for n, v in step.items() if ".self_attn." in n]
    outside = [v for n, v in step.items() if ".self_attn." not in n]
    assert attention and outside
    assert max(attention) == pytest.approx(1e-2, rel=1e-3) and max(outside) == pytest.approx(1e-3, rel=1e-3)
    bad = run("finetune", tpa, tmp_path / "bad", "--data", tokens_file, "--outside-lr-ratio", "0.1")
    one_line_error(bad, "--outside-lr-ratio", "--trainable")  # attention only: nothing outside it trains
    assert not (tmp_path / "bad").exists()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's PeftModel asks for it
def test_lora_saves_a_loadable_merged_model(tpa, tokens_file, tmp_path):
    from peft import PeftModel

    out = finetune(
        options(tpa, tmp_path / "lora", tokens_file, steps=4, lora_r=4, save_adapter=True, lr=1e-2), progress=False
    )
    before, after = weights(tpa), weights(out)
    assert before.keys() == after.keys()  # merged: no lora_A / base_layer names
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".mlp." in n for n in changed) and any(".self_attn." in n for n in changed)
    assert not any("embed" in n or "norm" in n for n in changed)

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tpa, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = random_ids(2, 20, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


def interrupt_at(monkeypatch, at: int, sig: signal.Signals):
    """Raise `sig` as training step `at` starts; returns the real train_step, to put back."""
    original = loop.train_step

    def interrupted(training, step, stop):
        if step == at:
            signal.raise_signal(sig)
        return original(training, step, stop)

    monkeypatch.setattr(loop, "train_step", interrupted)
    return original


def test_resume_equals_an_uninterrupted_run(tpa, tokens_file, tmp_path, monkeypatch):
    common = dict(steps=10, save_every=5, grad_accum=2, batch_size=2, eval_every=4)
    straight = finetune(options(tpa, tmp_path / "straight", tokens_file, **common), progress=False)
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job

    # Interrupt the second run with SIGINT during step 5: it checkpoints after that step and stops.
    original = interrupt_at(monkeypatch, 4, signal.SIGINT)
    resumed_dir = tmp_path / "resumed"
    with pytest.raises(Exception, match="stopped by SIGINT after step 5 of 10.*--resume"):
        finetune(options(tpa, resumed_dir, tokens_file, **common), progress=False)
    monkeypatch.setattr(loop, "train_step", original)
    assert [p.name for p in (resumed_dir / CHECKPOINTS).iterdir()] == ["step-00000005"]
    assert not (resumed_dir / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored

    # Without --resume the folder is not touched; with it, training continues from step 5.
    with pytest.raises(Exception, match="exists; pass --resume"):
        finetune(options(tpa, resumed_dir, tokens_file, **common), progress=False)
    with pytest.raises(Exception, match="other options.*lr"):
        finetune(options(tpa, resumed_dir, tokens_file, resume=True, **{**common, "lr": 1e-3}), progress=False)
    finetune(options(tpa, resumed_dir, tokens_file, resume=True, **common), progress=False)

    a, b = weights(straight), weights(resumed_dir)
    assert all(torch.equal(a[n], b[n]) for n in a)

    def untimed(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    assert untimed(metrics(resumed_dir)) == untimed(metrics(straight))
    assert [p.name for p in (straight / CHECKPOINTS).iterdir()] == ["step-00000005", "step-00000010"]


def test_interrupted_overwrite_keeps_the_previous_model(tpa, tokens_file, tmp_path, monkeypatch):
    """--overwrite (what `run` uses when finetune options change) trains beside OUT and swaps at the end: an
    interrupted re-run leaves the previous healed model whole; a finished one replaces it and leaves nothing."""
    out = tmp_path / "healed"
    finetune(options(tpa, out, tokens_file, steps=2), progress=False)
    before = weights(out)
    original = interrupt_at(monkeypatch, 1, signal.SIGTERM)
    with pytest.raises(Exception, match="stopped by SIGTERM.*still holds the previous model.*--overwrite"):
        finetune(options(tpa, out, tokens_file, steps=4, lr=1e-2, overwrite=True), progress=False)
    monkeypatch.setattr(loop, "train_step", original)
    after = weights(out)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert len(metrics(out)) == 3  # the first run's: before training and 2 steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]

    finetune(options(tpa, out, tokens_file, steps=4, lr=1e-2, overwrite=True), progress=False)
    replaced = weights(out)
    assert any(not torch.equal(before[n], replaced[n]) for n in before)
    assert metrics(out)[-1]["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]  # no staging folder left beside it


def test_checkpoint_from_more_processes_resumes_with_more_accumulation(tpa, tokens_file, tmp_path, monkeypatch):
    """A checkpoint written by 2 processes × 1 micro-batch goes on in 1 process × 2 (same global batch and
    block order); any other split is refused with a clear message."""
    common = dict(steps=6, save_every=3, batch_size=2)
    original = interrupt_at(monkeypatch, 2, signal.SIGINT)
    out = tmp_path / "run"
    with pytest.raises(Exception, match="--resume"):
        finetune(options(tpa, out, tokens_file, grad_accum=2, **common), progress=False)
    monkeypatch.setattr(loop, "train_step", original)
    # Make the checkpoint look as if two processes wrote it, each with one micro-batch per step.
    state_file = next((out / CHECKPOINTS).iterdir()) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["world_size"], state["options"]["grad_accum"] = 2, 1
    state_file.write_text(json.dumps(state))
    with pytest.raises(Exception, match="keep processes × --grad-accum the same"):
        finetune(options(tpa, out, tokens_file, resume=True, grad_accum=1, **common), progress=False)
    finetune(options(tpa, out, tokens_file, resume=True, grad_accum=2, **common), progress=False)
    straight = finetune(options(tpa, tmp_path / "straight", tokens_file, grad_accum=2, **common), progress=False)
    a, b = weights(straight), weights(out)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_grad_checkpointing_and_accumulation_do_not_change_the_result(tpa, tokens_file, tmp_path):
    """2 micro-batches of 2 blocks == 1 of 4 (same blocks per step); checkpointing changes memory, not math."""
    one = finetune(options(tpa, tmp_path / "a", tokens_file, steps=3, batch_size=4), progress=False)
    two = finetune(
        options(tpa, tmp_path / "b", tokens_file, steps=3, batch_size=2, grad_accum=2, grad_checkpointing=True),
        progress=False,
    )
    a, b = weights(one), weights(two)
    # Another batch shape rounds the fp32 sums differently, and Adam's m/√v turns a rounding-sized gradient
    # element into an lr-sized step (one element of 8192 moved 4e-6 here): a wrong accumulation moves all by ~lr.
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)


def test_cross_entropy_only_needs_no_teacher(source_dirs, tokens_file, tmp_path):
    """kl_weight 0: plain next-token training, also of a model that records no source (here: a Llama)."""
    out = finetune(
        options(source_dirs["llama_gqa"], tmp_path / "ce", tokens_file, steps=6, kl_weight=0, ce_weight=1),
        progress=False,
    )
    rows = [r for r in metrics(out) if "loss" in r]
    assert all(r["kl"] == 0 and r["loss"] == pytest.approx(r["ce"]) for r in rows)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["teacher"] is None and summary["eval"]["after_ppl"] < summary["eval"]["before_ppl"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_hidden_state_distillation_alone_heals_from_the_cli(tpa, tokens_file, tmp_path):
    """--hidden-weight with --kl-weight 0: the layer-wise term alone trains, is logged, and lowers perplexity."""
    out = tmp_path / "hidden"
    result = run("finetune", tpa, out, "--data", tokens_file, "--steps", 8, "--seq-len", SEQ, "--batch-size", 4,
                 "--lr", 3e-3, "--kl-weight", 0, "--hidden-weight", 1)
    assert result.exit_code == 0, result.output
    rows = [r for r in metrics(out) if "loss" in r]
    assert all(r["kl"] == 0 and r["loss"] == pytest.approx(r["hidden"], rel=1e-5) for r in rows)
    assert rows[-1]["hidden"] < rows[0]["hidden"]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["eval"]["after_ppl"] < summary["eval"]["before_ppl"]


def test_attention_term_alone_trains_only_the_attention_blocks(tpa, tokens_file, tmp_path):
    """--attention-weight with --kl-weight 0 and every weight trainable: each attention block is fed the teacher's
    input, so only attention weights get gradients; the term is logged and falls, with or without checkpointing."""
    out = tmp_path / "local"
    result = run("finetune", tpa, out, "--data", tokens_file, "--steps", 8, "--seq-len", SEQ, "--batch-size", 4,
                 "--lr", 3e-3, "--trainable", "all", "--kl-weight", 0, "--attention-weight", 1)
    assert result.exit_code == 0, result.output
    rows = [r for r in metrics(out) if "loss" in r]
    assert all(r["kl"] == 0 and r["loss"] == pytest.approx(r["attention"], rel=1e-5) for r in rows)
    assert rows[-1]["attention"] < rows[0]["attention"]
    before, after = weights(tpa), weights(out)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(".self_attn." in name for name in moved)
    # The second passes run outside activation checkpoints, so checkpointing changes nothing that is computed.
    result = run("finetune", tpa, tmp_path / "checkpointed", "--data", tokens_file, "--steps", 8, "--seq-len", SEQ,
                 "--batch-size", 4, "--lr", 3e-3, "--trainable", "all", "--kl-weight", 0, "--attention-weight", 1,
                 "--grad-checkpointing")
    assert result.exit_code == 0, result.output
    checkpointed = weights(tmp_path / "checkpointed")
    assert all(torch.allclose(after[name], checkpointed[name], atol=1e-6) for name in after)


def test_attention_match_is_zero_for_an_exact_conversion_and_only_while_training(converted, source_model,
                                                                                load_model):
    """Full rank: each converted block reproduces the source block on the same input (error ~ 0); rank 1 does
    not; and nothing is recorded without gradients (evaluation) or outside collect()."""
    from factorconv.finetune.attention_match import AttentionMatch

    teacher, ids = source_model("llama_gqa"), random_ids(2, 24, seed=3)
    errors = {}
    for label, options in (("exact", {}), ("rank 1", {"rank_k": 1, "rank_v": 1})):
        student = load_model(converted("llama_gqa", **options))
        match = AttentionMatch(student, teacher)
        try:
            with match.collect():
                with torch.no_grad():
                    teacher(input_ids=ids)
                student(input_ids=ids)
                errors[label] = match.error(ids.device)
            with match.collect(), torch.no_grad():
                teacher(input_ids=ids)
                student(input_ids=ids)
                errors[label + ", no grad"] = match.error(ids.device)
            student(input_ids=ids)
            errors[label + ", outside"] = match.error(ids.device)
        finally:
            match.remove()
    assert errors["exact"] < 1e-9 and errors["rank 1"] > 1e-3 and errors["rank 1"].requires_grad
    assert all(errors[f"{label}, {when}"] == 0 for label in ("exact", "rank 1") for when in ("no grad", "outside"))


def test_attention_match_refuses_models_it_cannot_pair(converted, source_model, load_model):
    import copy

    from factorconv.errors import FactorConvError
    from factorconv.finetune.attention_match import AttentionMatch

    student, teacher = load_model(converted("llama_gqa")), copy.deepcopy(source_model("llama_gqa"))
    del teacher.model.layers[1:]
    with pytest.raises(FactorConvError, match="attention blocks and the teacher 1"):
        AttentionMatch(student, teacher)
    with pytest.raises(FactorConvError, match="no 'self_attn' modules"):
        AttentionMatch(student, torch.nn.Linear(2, 2))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_is_kl_teacher_to_student_plus_ce(temperature):
    import torch.nn.functional as F

    from factorconv.finetune.loss import distillation_loss

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 11, generator=gen, requires_grad=True)
    teacher, ids = torch.randn(2, 6, 11, generator=gen), torch.randint(0, 11, (2, 6), generator=gen)
    parts = distillation_loss(student, teacher, ids, kl_weight=1.0, ce_weight=0.5, temperature=temperature)
    p, log_q = F.softmax(teacher / temperature, -1), F.log_softmax(student / temperature, -1)
    kl = (p * (p.log() - log_q)).sum(-1).mean() * temperature**2
    ce = F.cross_entropy(student[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(parts.kl, kl.detach())
    torch.testing.assert_close(parts.ce, ce.detach())
    torch.testing.assert_close(parts.loss, kl + 0.5 * ce)
    assert distillation_loss(teacher, teacher, ids).kl.abs() < 1e-6  # zero when the student is the teacher


def test_hidden_state_term_is_the_layer_mean_of_normalised_errors():
    from factorconv.finetune.loss import distillation_loss

    gen = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 6, 11, generator=gen), torch.randint(0, 11, (2, 6), generator=gen)
    teacher = tuple(torch.randn(2, 6, 4, generator=gen) * scale for scale in (1.0, 10.0))
    student = tuple((t + torch.randn(2, 6, 4, generator=gen) * 0.1 * t.std()).requires_grad_() for t in teacher)
    parts = distillation_loss(logits, logits, ids, hidden=(student, teacher), hidden_weight=2.0)
    errors = [((s - t) ** 2).sum() / (t**2).sum() for s, t in zip(student, teacher)]
    torch.testing.assert_close(parts.hidden, ((errors[0] + errors[1]) / 2).detach())
    torch.testing.assert_close(parts.loss, errors[0] + errors[1], atol=1e-6, rtol=1e-5)  # KL of equal logits: 0
    parts.loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert distillation_loss(logits, logits, ids, hidden=(teacher, teacher), hidden_weight=1.0).hidden == 0


def test_options_parse_token_counts_and_reject_conflicts():
    from pydantic import ValidationError

    o = FinetuneOptions(model="m", output="o", data="corpus/", tokens="50M", lora_targets="up_proj, down_proj")
    assert o.tokens == 50_000_000 and o.data == ["corpus/"] and o.lora_targets == ["up_proj", "down_proj"]
    assert FinetuneOptions(model="m", output="o", data=["d"], tokens="1.5k").tokens == 1500
    for bad in ({"tokens": "lots"}, {"resume": True, "overwrite": True}, {"save_adapter": True},
                {"kl_weight": 0}, {"device": "cuda:1"}, {"epochs": 2}, {"hidden_weight": -1},
                {"attention_weight": -1}):
        with pytest.raises(ValidationError):
            FinetuneOptions(model="m", output="o", data=["d"], **bad)


def test_schedule_warmup_then_cosine():
    o = FinetuneOptions(model="m", output="o", data=["d"], lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, o, total=20, warmup=4) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0.1


def test_default_lr_follows_the_measured_best_and_the_width():
    """At the two measured widths the rule gives the measured best (heal_curves_*.md); wider models get less."""
    assert default_lr("attention", 64) == pytest.approx(2e-2)
    assert default_lr("attention", 512) == pytest.approx(2.5e-3)  # measured: 1e-3 1.086x, 3e-3 1.078x, 1e-2 1.173x
    assert default_lr("attention+norms", 512) == default_lr("attention", 512)
    assert default_lr("all", 64) == pytest.approx(3e-3)
    assert default_lr("all", 512) == pytest.approx(1.06e-3, rel=0.01)
    assert default_lr("all", 4096) < default_lr("all", 512) and default_lr("attention", 4096) < 5e-4


@pytest.mark.parametrize("given", [None, 5e-3])
def test_an_unset_lr_resolves_for_the_model_and_is_saved(given, tpa, tokens_file, tmp_path):
    """No --lr: the width rule for this model, used by the schedule and recorded (so --resume compares what ran)."""
    out = tmp_path / "healed"
    finetune(options(tpa, out, tokens_file, steps=4, warmup=0, lr=given), progress=False)
    hidden = json.loads((tpa / "config.json").read_text())["hidden_size"]
    expected = default_lr("attention", hidden) if given is None else given
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["options"]["lr"] == pytest.approx(expected)
    assert metrics(out)[1]["lr"] == pytest.approx(expected)  # step 1 of 4, no warmup: the peak


# --- data ----------------------------------------------------------------------------------------------------------


def test_sampler_is_deterministic_and_shards_do_not_overlap():
    sampler = data_lib.BlockSampler(num_blocks=50, batch_size=3, grad_accum=2, world=4, seed=1)
    per_epoch = 50 // (3 * 2 * 4)
    for step in range(per_epoch):
        blocks = [sampler.indices(step, m, r) for m in range(2) for r in range(4)]
        flat = [b for part in blocks for b in part]
        assert len(set(flat)) == len(flat) == 24
    # The blocks of one optimizer step depend on batch × accumulation × processes only.
    other = data_lib.BlockSampler(num_blocks=50, batch_size=6, grad_accum=1, world=4, seed=1)
    for step in range(5):
        ours = sorted(b for m in range(2) for r in range(4) for b in sampler.indices(step, m, r))
        theirs = sorted(b for r in range(4) for b in other.indices(step, 0, r))
        assert ours == theirs
    # Two epochs cover every block twice; another seed gives another order.
    fresh = data_lib.BlockSampler(num_blocks=10, batch_size=5, grad_accum=1, world=1, seed=1)
    seen = [b for s in range(4) for b in fresh.indices(s, 0, 0)]
    assert sorted(seen) == sorted(list(range(10)) * 2)
    assert seen != [b for s in range(4) for b in data_lib.BlockSampler(10, 5, 1, 1, seed=2).indices(s, 0, 0)]


def test_folders_of_text_jsonl_and_npy_are_packed(source_dirs, tmp_path):
    from conftest import tiny_tokenizer

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("w1 w2 w3 w4 w5")
    (folder / "sub" / "b.jsonl").write_text('{"text": "w6 w7"}\n{"text": "w8"}\n')
    np.save(folder / "c.npy", np.array([9, 10, 11], dtype=np.uint16))
    (folder / "notes.md").write_text("ignored")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.txt").write_text("w100")
    (folder / "empty.txt").write_text("")
    sources = data_lib.resolve_sources([str(folder)])
    assert [f.name for f in sources[0][1]] == ["a.txt", "c.npy", "empty.txt", "b.jsonl"]
    stream = data_lib.load_stream(sources, tiny_tokenizer())
    assert stream.tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 9, 10, 11]  # sorted paths: a.txt, c.npy, sub/b.jsonl
    split = data_lib.split_blocks(stream, 4, None, eval_fraction=0.3, eval_tokens=1000)
    assert split.train.tolist() == [[4, 5, 6, 7]] and split.eval.tolist() == [[8, 9, 10, 11]] and split.held_out


# --- errors --------------------------------------------------------------------------------------------------------


def test_errors_are_one_line(tpa, converted, source_dirs, tokens_file, tmp_path):
    out = tmp_path / "out"
    common = ["--steps", 1, "--seq-len", SEQ]
    one_line_error(run("finetune", tpa, out, "--data", tmp_path / "nothing", *common), "no training data found")
    (tmp_path / "empty").mkdir()
    one_line_error(run("finetune", tpa, out, "--data", tmp_path / "empty", *common), "no training data found")
    one_line_error(
        run("finetune", tpa, out, "--data", tokens_file, "--steps", 1, "--seq-len", 4096), "exceeds", "context of 128"
    )
    # A teacher with another vocabulary (a GPT-2 saved locally).
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB + 8, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    one_line_error(
        run("finetune", tpa, out, "--data", tokens_file, "--teacher", gpt2, *common), "vocabulary of 136", "has 128"
    )
    big = tmp_path / "big.npy"
    np.save(big, np.array([1, 2, VOCAB + 5] * 40, dtype=np.uint16))
    one_line_error(run("finetune", tpa, out, "--data", big, *common), "token id 133")
    one_line_error(run("finetune", tpa, out, "--data", tokens_file, "--steps", 1, "--tokens", 5), "not both")
    one_line_error(run("finetune", tpa, out, "--data", tokens_file, "--lora-r", 2, "--trainable", "all"), "nothing")
    one_line_error(
        run("finetune", tpa, out, "--data", tokens_file, "--lora-r", 2, "--lora-targets", "q_proj", *common),
        "already trained",
    )
    one_line_error(run("finetune", source_dirs["llama_gqa"], out, "--data", tokens_file, *common), "--teacher")
    assert not out.exists()
    out.mkdir()
    (out / "something").write_text("x")
    one_line_error(run("finetune", tpa, out, "--data", tokens_file, *common), "exists", "--resume", "--overwrite")
    one_line_error(run("finetune", tpa, tpa, "--data", tokens_file, *common, "--overwrite"), "overwrite the input")
    assert (out / "something").is_file()


# --- two processes -------------------------------------------------------------------------------------------------

SHARD_LOGGER = '''
import json, os, sys
from factorconv.finetune import data

seen = []
original = data.BlockSampler.indices

def record(self, step, micro, rank):
    blocks = original(self, step, micro, rank)
    seen.append({"step": step, "micro": micro, "rank": rank, "blocks": blocks})
    return blocks

data.BlockSampler.indices = record
from factorconv.cli import main

try:
    main(sys.argv[1:], prog_name="factorconv")
finally:
    with open(os.environ["SHARD_LOG"] + "." + os.environ["RANK"] + ".json", "w") as f:
        json.dump(seen, f)
'''


@pytest.mark.parametrize("extra", [{}, {"attention_weight": 1.0}], ids=["kl", "kl+attention"])
def test_two_cpu_processes_stay_in_sync_on_disjoint_shards(tpa, tokens_file, tmp_path, extra):
    """torchrun + gloo (accelerate's MULTI_CPU): same final weights on both ranks, no block read twice; the
    layer-local term's second passes (outside DDP's forward) are synchronised like the rest."""
    import os
    import subprocess
    import sys

    script = tmp_path / "logged_finetune.py"
    script.write_text(SHARD_LOGGER)
    out = tmp_path / "ddp"
    args = ["-q", "finetune", tpa, out, "--data", tokens_file, "--steps", 4, "--seq-len", SEQ, "--batch-size", 2,
            "--lr", "3e-3", "--save-every", 2]
    args += [a for key, value in extra.items() for a in ("--" + key.replace("_", "-"), value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARD_LOG": str(tmp_path / "shards")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(
        command + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # the summary line comes from rank 0 only

    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["processes"] == 2 and summary["tokens"] == 4 * 2 * 2 * SEQ
    assert len(summary["replica_checksums"]) == 2 and summary["replicas_identical"]
    logs = [json.loads((tmp_path / f"shards.{rank}.json").read_text()) for rank in (0, 1)]
    assert [{e["rank"] for e in log} for log in logs] == [{0}, {1}]
    blocks = [[b for e in log for b in e["blocks"]] for log in logs]
    assert len(blocks[0]) == len(blocks[1]) == 8
    assert not set(blocks[0]) & set(blocks[1]) and len(set(blocks[0] + blocks[1])) == 16

    # Synchronised gradients: the same as one process accumulating the two ranks' micro-batches.
    single = finetune(
        options(tpa, tmp_path / "single", tokens_file, steps=4, batch_size=2, grad_accum=2, **extra), progress=False
    )
    a, b = weights(out), weights(single)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-6)


GRAD_NORM_CHECK = '''
import json, os, sys, types

import torch
from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from factorconv.finetune.loop import clip_gradients

accelerator = Accelerator(cpu=True)  # MULTI_CPU over gloo: sets up the process group
mesh = init_device_mesh("cpu", (accelerator.num_processes,))
gradient = torch.arange(1.0, 17.0).reshape(8, 2)  # global; each rank holds 4 of its rows, as under FSDP2
# accelerate before huggingface/accelerate#4219 returned torch's clip_grad_norm_ under FSDP2: a DTensor norm
releases = {"accelerate<4219": types.SimpleNamespace(clip_grad_norm_=torch.nn.utils.clip_grad_norm_),
            "accelerate": accelerator}
results = {}
for name, acc in releases.items():
    for max_norm in (0.0, 1.0):
        param = torch.nn.Parameter(distribute_tensor(torch.zeros(8, 2), mesh, [Shard(0)]))
        param.grad = distribute_tensor(gradient.clone(), mesh, [Shard(0)])
        norm = clip_gradients(acc, (param,), max_norm)
        results[f"{name} max_norm={max_norm}"] = {
            "type": type(norm).__name__,
            "norm": norm.item(),
            "grad_norm_after": param.grad.full_tensor().norm().item(),
        }
with open(os.environ["GRAD_NORM_LOG"] + "." + str(accelerator.process_index) + ".json", "w") as f:
    json.dump(results, f)
# a process group left to interpreter teardown can abort gloo's threads ("terminate called without an active
# exception") after the results are written: close it while every rank is still here
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
'''


def test_gradient_norm_of_sharded_gradients_comes_back_as_one_plain_number(tmp_path):
    """FSDP2 shards gradients as DTensors: the logged norm is the global one as a plain tensor (some accelerate
    releases hand back a DTensor, which would not join the step statistics), and max_grad_norm 0 clips nothing."""
    import os
    import subprocess
    import sys

    script = tmp_path / "grad_norm.py"
    script.write_text(GRAD_NORM_CHECK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRAD_NORM_LOG": str(tmp_path / "norms")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    full = torch.arange(1.0, 17.0).norm().item()
    for rank in (0, 1):
        results = json.loads((tmp_path / f"norms.{rank}.json").read_text())
        assert len(results) == 4
        for case, got in results.items():
            assert got["type"] == "Tensor", (rank, case, got)
            assert got["norm"] == pytest.approx(full), (rank, case, got)
            clipped_to = 1.0 if case.endswith("max_norm=1.0") else full
            assert got["grad_norm_after"] == pytest.approx(clipped_to, rel=1e-5), (rank, case, got)


def test_shipped_accelerate_configs_parse():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    import factorconv.modeling.modeling_factorconv as modeling

    folder = Path(__file__).parents[1] / "recipes" / "accelerate"
    kinds = {}
    for name in ("single_gpu", "multi_gpu_ddp", "fsdp"):
        config = load_config_from_file(str(folder / f"{name}.yaml"))
        kinds[name] = config.distributed_type.value
        assert config.mixed_precision == "bf16"
    assert kinds == {"single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU", "fsdp": "FSDP"}
    layer = load_config_from_file(str(folder / "fsdp.yaml")).fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert hasattr(modeling, layer)


def test_a_datasets_name_is_streamed_up_to_what_the_run_needs(tpa, tmp_path, monkeypatch):
    """'name:config' goes to datasets.load_dataset(streaming=True); only the tokens the run needs are read."""
    import sys
    import types

    calls, rows_read = [], []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))

        def rows():
            for i in range(10**6):
                rows_read.append(i)
                yield {"text": " ".join(f"w{(i * 7 + j) % 100}" for j in range(20))}

        return rows()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = finetune(
        FinetuneOptions(model=str(tpa), output=tmp_path / "ds", data=["org/corpus:sample"], dataset_split="train",
                        steps=2, seq_len=SEQ, batch_size=2, eval_tokens=64, lr=1e-3),
        progress=False,
    )
    assert calls == [("org/corpus", "sample", "train", True)]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    needed = 2 * 2 * SEQ / 0.95 + 64 + SEQ  # planned tokens, the held-out share, one block of slack
    assert len(rows_read) * 20 < needed + 40 and summary["train_blocks"] >= 4


def test_disk_full_when_writing_the_healed_model(tpa, tokens_file, tmp_path, monkeypatch):
    import errno

    import factorconv.finetune.output as output

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "write_weights", full)
    out = tmp_path / "healed"
    one_line_error(run("finetune", tpa, out, "--data", tokens_file, "--steps", 2, "--seq-len", SEQ), "No space left")
    assert not list(out.glob("*.safetensors")) and not list(out.glob(".model-partial-*"))
