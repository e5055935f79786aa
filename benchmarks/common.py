"""Shared pieces of the benchmark scripts: convert-and-load, one measured row, the Markdown table."""

import os
import platform
import site
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

import factorconv
from factorconv.convert import convert
from factorconv.convert.options import ConvertOptions
from factorconv.evaluate.kv_cache import analytic_kv_bytes_per_token, measured_kv_bytes_per_token
from factorconv.evaluate.perplexity import perplexity

# ../shared/real beside the checkout; FACTORCONV_REAL points elsewhere (e.g. a copy carried to a GPU machine)
REAL = Path(os.environ.get("FACTORCONV_REAL", Path(__file__).resolve().parents[2] / "shared" / "real"))
LLAMA_3_2_1B = dict(  # the public config's shapes; weights are random in every benchmark
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
LLAMA_3_1_8B = dict(  # the public config's shapes (tests/fixtures/llama-3.1-8b)
    LLAMA_3_2_1B,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    head_dim=128,
    tie_word_embeddings=False,
    rope_parameters={**LLAMA_3_2_1B["rope_parameters"], "factor": 8.0},
)
TINY_LLAMA = dict(  # CPU side of the decode benchmark: small enough for long contexts, 8 KV heads as the 8B
    LLAMA_3_2_1B,
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def convert_and_load(source: Path, output: Path, **options) -> tuple[PreTrainedModel, float]:
    """Convert with the given options; return the loaded fp32 model (on the conversion device) and seconds taken."""
    start = time.perf_counter()
    folder = convert(ConvertOptions(source=str(source), output=output, overwrite=True, **options), progress=False)
    seconds = time.perf_counter() - start
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model.to(options.get("device", "cpu")), seconds


def measure(
    method: str, model: PreTrainedModel, tokens: torch.Tensor, seq_len: int, source_ppl: float | None, seconds: float
) -> dict:
    ppl = perplexity(model, tokens, seq_len, progress=False)
    return {
        "method": method,
        "kv_bytes": analytic_kv_bytes_per_token(model.config, 4),
        "kv_measured": measured_kv_bytes_per_token(model),
        "ppl": ppl,
        "ratio": ppl / source_ppl if source_ppl else 1.0,
        "seconds": seconds,
    }


def machine() -> str:
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU"
    return f"{where}, torch {torch.__version__}, factorconv {factorconv.__version__}"


def print_table(rows: list[dict], model: Path, data: Path, tokens: int, seq_len: int) -> None:
    print(f"model: {model.name}, data: {data.name} ({tokens:,} tokens, windows of {seq_len}), fp32, {machine()}\n")
    print("| method | KV bytes/token | measured | of source | perplexity | ratio | convert s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["kv_bytes"]
    for r in rows:
        print(
            f"| {r['method']} | {r['kv_bytes']:,} | {r['kv_measured']:,.0f} | {r['kv_bytes'] / base:.1%} | "
            f"{r['ppl']:.3f} | {r['ratio']:.2f}x | {r['seconds']:.2f} |"
        )


def text_slice(spec: Path | tuple[Path, int], folder: Path) -> Path:
    """A data file, or (file, n) as a .txt of its first n bytes (last -n when negative) written into `folder`."""
    if isinstance(spec, Path):
        return spec
    path, count = spec
    data = path.read_bytes()
    part = folder / f"{path.stem}.{'last' if count < 0 else 'first'}{abs(count)}.txt"
    part.write_bytes(data[count:] if count < 0 else data[:count])
    return part


def python_corpus(folder: Path, megabytes: float) -> Path:
    """The installed packages' Python source, `transformers` excluded, sorted by path, up to `megabytes`."""
    roots = sorted({Path(p) for p in site.getsitepackages() if Path(p).is_dir()})
    limit, size = int(megabytes * 1e6), 0
    out = folder / "python_corpus.txt"
    with out.open("w", encoding="utf-8") as handle:
        for root in roots:
            for path in sorted(root.rglob("*.py")):
                if "transformers" in path.relative_to(root).parts[:1] or size >= limit:
                    continue
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                handle.write(text + "\n\n")
                size += len(text.encode("utf-8")) + 2
    return out
