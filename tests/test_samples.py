"""`factorconv sample`: healing data sampled from the source, a stream `finetune --data` reads."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import VOCAB
from transformers import AutoTokenizer

from factorconv.cli import main
from factorconv.finetune.output import SUMMARY_FILE
from factorconv.finetune.samples import SampleOptions, sample_tokens

LENGTH = 32


def run(*args):
    return CliRunner().invoke(main, ["-q", *map(str, args)])


@pytest.fixture(scope="module")
def source(source_dirs):
    return source_dirs["llama_gqa"]


def test_samples_are_full_sequences_from_bos_and_reproducible(source, source_model, tmp_path):
    bos = source_model("llama_gqa").config.bos_token_id
    options = SampleOptions(tokens=300, length=LENGTH, batch_size=4)
    first = sample_tokens(str(source), tmp_path / "a.npy", options, device="cpu", progress=False)
    ids = np.load(first)
    assert ids.shape == (10 * LENGTH,)  # rounded up to whole sequences
    rows = ids.reshape(-1, LENGTH)
    assert (rows[:, 0] == bos).all() and ids.max() < VOCAB
    assert len({tuple(r) for r in rows}) == len(rows)  # sampled, not greedy copies of one sequence
    again = np.load(sample_tokens(str(source), tmp_path / "b.npy", options, device="cpu", progress=False))
    other = np.load(sample_tokens(str(source), tmp_path / "c.npy", options.model_copy(update={"seed": 1}),
                                  device="cpu", progress=False))
    assert (again == ids).all()
    assert not (other == ids).all()
    assert not list(tmp_path.glob(".*partial*"))


# user turns open with "<s> w1", the assistant's with "<s> w2"; every turn ends with "</s>" (EOS, id 2)
TEMPLATE = ("{% for m in messages %}<s> w1 {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> w2 {% endif %}")


def test_chat_samples_are_conversations_through_the_template(source, tmp_path):
    folder = tmp_path / "chat-model"
    shutil.copytree(source, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    result = run("sample", folder, tmp_path / "c.npy", "--tokens", 200, "--length", LENGTH, "--batch-size", 4,
                 "--chat", "--device", "cpu")
    assert result.exit_code == 0, result.output
    ids = np.load(tmp_path / "c.npy").tolist()
    assert len(ids) >= 200
    starts = [i for i in range(len(ids) - 1) if ids[i:i + 2] == [1, 4]]
    headers = [i for i in range(len(ids) - 2) if ids[i:i + 3] == [2, 1, 5]]
    assert starts[0] == 0 and len(starts) == len(headers) and len(starts) % 4 == 0  # whole batches of 4
    for i, (start, header) in enumerate(zip(starts, headers)):
        end = starts[i + 1] if i + 1 < len(starts) else len(ids)
        assert start < header < end
        assert 2 not in ids[start + 2:header]  # the user turn was cut at its EOS ...
        assert header - start - 2 <= LENGTH // 4  # ... or at a quarter of --length
        answer = ids[header + 3:end]
        assert 0 < len(answer) <= LENGTH and 2 not in answer[:-1]  # the answer ends at its first EOS or the cap
    result = run("sample", folder, tmp_path / "short.npy", "--tokens", 64, "--length", 4, "--chat", "--device", "cpu")
    assert result.exit_code == 1 and "opening is 2 tokens; raise --length above 4" in result.output, result.output


def test_chat_samples_need_a_chat_template(source, source_dirs, tmp_path):
    for folder, message in ((source, "chat template"), (source_dirs["llama_mha"], "needs the model's tokenizer")):
        result = run("sample", folder, tmp_path / "c.npy", "--tokens", 64, "--length", LENGTH, "--chat",
                     "--device", "cpu")
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output
        assert not (tmp_path / "c.npy").exists()


def test_healing_on_samples_from_the_cli_lowers_perplexity_on_other_samples(source, converted, tmp_path):
    train, held_out = tmp_path / "train.npy", tmp_path / "held_out.npy"
    for path, seed in ((train, 0), (held_out, 1)):
        result = run("sample", source, path, "--tokens", "4K", "--length", LENGTH, "--seed", seed, "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert f"wrote {path}" in result.output
    out = tmp_path / "healed"
    result = run("finetune", converted("llama_gqa", rank_k=1, rank_v=1), out, "--data", train, "--eval-data", held_out,
                 "--steps", 12, "--seq-len", LENGTH, "--batch-size", 4, "--lr", 3e-3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["eval"]["after_ppl"] < summary["eval"]["before_ppl"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokens", "1K"], "name the output"),  # OUTPUT is samples.txt below
        (["--tokens", "lots"], "is not a token count"),
        (["--tokens", "8", "--length", "16"], "--tokens >= --length"),
        (["--tokens", "1K", "--temperature", "0"], "--temperature"),
    ],
)
def test_bad_sample_options_are_one_line_errors(source, tmp_path, args, message):
    result = run("sample", source, tmp_path / "samples.txt" if message == "name the output" else tmp_path / "s.npy",
                 *args, "--device", "cpu")
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
    assert not (tmp_path / "s.npy").exists()


def test_existing_samples_are_kept_without_overwrite(source, tmp_path):
    path = tmp_path / "s.npy"
    np.save(path, np.arange(4))
    result = run("sample", source, path, "--tokens", "64", "--length", 16, "--device", "cpu")
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (np.load(path) == np.arange(4)).all()
    assert run("sample", source, path, "--tokens", "64", "--length", 16, "--device", "cpu", "--overwrite").exit_code == 0
    assert np.load(path).shape == (64,)
