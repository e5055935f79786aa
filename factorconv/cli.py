"""The `factorconv` command line: each command validates its input and calls one library function."""

import logging
from pathlib import Path

import click
from pydantic import ValidationError
from transformers.utils import logging as transformers_logging

from . import __version__
from .errors import FactorConvError
from .kinds import KINDS, REFINE_DEFAULTS_TEXT

KIND_CHOICE = click.Choice([kind.flag for kind in KINDS.values()])  # tpa, mfa, mfa-kr
ARGUMENTS = {"source", "output", "model", "recipe", "folder", "repo_id"}  # positional: named as in --help


def _options_error(err: ValidationError) -> str:
    """The first problem, naming the flag the user typed (--batch-size), not the field (batch_size)."""
    first = err.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:
        return message
    field = str(first["loc"][0])
    where = field.upper() if field in ARGUMENTS else "--" + field.replace("_", "-")
    return f"invalid {where}: {message}"


def _given(options: dict) -> dict:
    """The options the user set; unset ones (None) take the library's defaults, defined once in ConvertOptions."""
    return {name: value for name, value in options.items() if value is not None}


def _quiet(ctx: click.Context, param: click.Parameter, quiet: bool) -> None:
    if quiet:
        ctx.obj["progress"] = False
        transformers_logging.disable_progress_bar()


class _UsageError(click.UsageError):
    """A mistyped flag or value: one line with where to look, not click's usage block (exit code 2 as usual)."""

    def show(self, file=None) -> None:
        where = self.ctx.command_path if self.ctx is not None else "factorconv"
        click.echo(f"Error: {self.format_message()} (see '{where} --help')", file=file, err=True)


class _Commands(click.Group):
    """Turns a command's FactorConvError or invalid options into one `Error: ...` line and exit code 1.

    Every command also takes `-q` after its name (`factorconv convert ... -q`), as well as before it.
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_quiet,
                                       help="No progress bars."))
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            raise _UsageError(err.format_message(), err.ctx) from None
        except FactorConvError as err:
            raise click.ClickException(str(err)) from None
        except ValidationError as err:
            raise click.ClickException(_options_error(err)) from None


@click.group(cls=_Commands)
@click.version_option(version=__version__, prog_name="factorconv")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def main(ctx: click.Context, quiet: bool) -> None:
    """Retrofit pretrained Llama-family models with factorized attention and a far smaller KV cache."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    transformers_logging.set_verbosity_error()
    if quiet:
        transformers_logging.disable_progress_bar()
    ctx.obj = {"progress": not quiet}


@main.command()
@click.argument("source")
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--to", "target", type=KIND_CHOICE, default="tpa", show_default=True, help="Target attention."
)
@click.option("--rank-k", type=int, help="TPA key rank R_K (default: the source's KV heads, exact).")
@click.option("--rank-v", type=int, help="TPA value rank R_V (default: the source's KV heads, exact).")
@click.option("--rank-q", type=int, help="Also factorize queries with this rank (exact at the number of heads).")
@click.option("--contextual", is_flag=True, help="Add input-dependent head factors a(x) = α + A x (cached per token).")
@click.option("--key-dim", type=int, help="MFA key width d_K (default: KV heads × head dim, exact).")
@click.option("--value-dim", type=int, help="MFA value width d_V (default: KV heads × head dim, exact).")
@click.option("--rope-dim", type=int, help="MFA-KR rotated width d_R (default: KV heads × head dim, exact).")
@click.option("--nope-dim", type=int, help="MFA-KR shared key/value width d_N (default: KV heads × head dim, exact).")
@click.option("--query-rank", type=int, help="MFA / MFA-KR: low-rank query product of this width.")
@click.option("--mla", is_flag=True,
              help="MFA-KR built to export as DeepSeek-V3 (MLA); shape from --mla-shape or --kv-budget.")
@click.option("--mla-shape", help="With --mla: kv_lora_rank+qk_rope_head_dim, e.g. 512+64 or 256+64.")
@click.option("--mqa", is_flag=True, help="MFA built to export as a Llama with one KV head.")
@click.option("--kv-budget", type=float, help="Fraction of the source's KV bytes; per-layer widths are allocated.")
@click.option("--allocation", type=click.Choice(["auto", "uniform", "greedy", "measured"]),
              help="How --kv-budget is spread over layers; auto: measured with --calib (probes each layer's cost), "
              "else uniform.")
@click.option("--calib", help="Calibration data: .txt, .jsonl, .npy or a datasets name.")
@click.option("--calib-samples", type=int, help="Calibration sequences (default 64).")
@click.option("--calib-seq-len", type=int, help="Tokens per calibration sequence (default: the context, at most 512).")
@click.option(
    "--init", type=click.Choice(["auto", "weight", "stats", "query-aware", "als"]), default="auto",
    show_default=True,
    help="Weight-only maths or calibration statistics (auto: stats with --calib); query-aware: MFA keys weighted "
    "by the queries; als: contextual TPA factors fitted to calibration keys/values (--to tpa --contextual).",
)
@click.option(
    "--refine-steps", type=int,
    help="Adam steps per layer fitting attention outputs (default with --calib: 200, up to 400 at --kv-budget 0.25 "
    "and below, fewer on a CPU for large models; 0: only a least-squares refit of the output projection).",
)
@click.option("--refine-batch", type=int,
              help="Calibration sequences per refinement step (default 4; on a CPU, where the default steps x "
              "sequences x tokens x layers x hidden size would exceed 1.5e9, 2, with the steps scaled to it).")
@click.option("--refine-lr", type=float,
              help=f"Adam's peak step as a fraction of each tensor's RMS (default: {REFINE_DEFAULTS_TEXT}).")
@click.option("--refine-schedule", type=click.Choice(["warmup-cosine", "constant"]),
              help=f"Step size over the refinement steps: warmup-cosine (10% warm-up, cosine decay to 10%) or "
                   f"constant (default: {REFINE_DEFAULTS_TEXT}).")
@click.option("--dtype", default="auto", show_default=True, help="auto (the source's), float32, bfloat16, float16.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard, e.g. 500MB.")
@click.option("--device", default="cpu", show_default=True, help="Where to run the factorization: cpu, cuda, auto.")
@click.option("--revision", help="Hub branch, tag or commit of SOURCE.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.pass_context
def convert(ctx: click.Context, source: str, output: Path, target: str, **kwargs) -> None:
    """Convert SOURCE (local folder or Hub id) into a factorized model written to OUTPUT."""
    from .convert import convert as run_convert
    from .convert.options import ConvertOptions

    options = ConvertOptions(source=source, output=output, to=target, **_given(kwargs))
    folder = run_convert(options, progress=ctx.obj["progress"])
    click.echo(f"wrote {folder}")


@main.command()
@click.argument("source")
@click.option("--to", "target", type=KIND_CHOICE, default="mfa", show_default=True)
@click.option("--kv-budget", type=float, required=True, help="Fraction of the source's KV bytes per token.")
@click.option("--allocation", type=click.Choice(["auto", "uniform", "greedy", "measured"]),
              help="How --kv-budget is spread over layers; auto: measured with --calib (probes each layer's cost), "
              "else uniform.")
@click.option("--contextual", is_flag=True, help="TPA: contextual head factors (cache D + heads per rank).")
@click.option("--calib", help="Calibration data for statistics-based spectra (optional).")
@click.option("--calib-samples", type=int, help="Calibration sequences (default 64).")
@click.option("--calib-seq-len", type=int, help="Tokens per calibration sequence (default: the context, at most 512).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--revision", help="Hub branch, tag or commit of SOURCE.")
def plan(source: str, target: str, **kwargs) -> None:
    """Print per-layer widths, KV bytes/token, parameters and predicted error for a KV budget; write nothing.

    Works from config.json alone (meta device): then widths are uniform and no error is predicted.
    """
    from .convert.options import ConvertOptions
    from .convert.plan import format_plan, make_plan

    options = ConvertOptions(source=source, output=Path("-"), to=target, **_given(kwargs))
    click.echo(format_plan(make_plan(options)))


@main.command(name="export")
@click.argument("model")
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--format", "format_", type=click.Choice(["deepseek-v3", "llama"]), required=True,
    help="deepseek-v3: MFA-KR as MLA (convert with --mla); llama: MFA as one KV head (convert with --mqa).",
)
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard, e.g. 500MB.")
@click.option("--revision", help="Hub branch, tag or commit of MODEL.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.pass_context
def export_command(ctx: click.Context, model: str, output: Path, format_: str, **kwargs) -> None:
    """Write MODEL (a factorconv folder) as a stock DeepSeek-V3 or Llama that serving engines run."""
    from .export import export

    folder = export(model, output, format_, progress=ctx.obj["progress"], **kwargs)
    click.echo(f"wrote {folder}")


@main.command(name="eval")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(path_type=Path), help=".txt, .jsonl or pre-tokenized .npy")
@click.option("--compare", help="Also evaluate this model (usually the source) on the same tokens.")
@click.option("--seq-len", type=click.IntRange(min=2), help="Window length (default: the context, at most 2048).")
@click.option("--max-tokens", type=click.IntRange(min=2), help="Evaluate only the first N tokens.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, auto.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.pass_context
def eval_command(ctx: click.Context, model: str, data: Path, compare: str | None, device: str, **kwargs) -> None:
    """Perplexity, KV bytes per token (analytic and measured) and parameters of MODEL, beside --compare."""
    from .convert.device import resolve_device
    from .evaluate.report import evaluate, format_table

    rows = evaluate(model, data, compare, device=resolve_device(device), progress=ctx.obj["progress"], **kwargs)
    click.echo(format_table(rows))


@main.command(name="run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe value (YAML).")
@click.pass_context
def run_command(ctx: click.Context, recipe: Path, overrides: tuple[str, ...]) -> None:
    """Run RECIPE: convert -> finetune -> eval -> push (stages without a section are skipped; done ones reused)."""
    from .run import run_recipe

    folder = run_recipe(recipe, overrides, progress=ctx.obj["progress"], echo=click.echo)
    click.echo(f"done: {folder}")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe value (YAML).")
def validate(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Check RECIPE and plan it against the source's config when reachable; writes nothing."""
    from .run import validate_recipe

    click.echo(validate_recipe(recipe, overrides))


@main.command(name="push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", help="Branch to push to (created if missing; default main).")
@click.option("--commit-message", help="Commit message (default: 'Upload FOLDER (factorconv)').")
def push_command(folder: Path, repo_id: str, private: bool, revision: str | None, commit_message: str | None) -> None:
    """Upload a complete output FOLDER to the Hub as REPO_ID (token from HF_TOKEN or `hf auth login`)."""
    from .hub import push

    url = push(folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    click.echo(f"pushed {folder} to {url}")


@main.command(name="sample")
@click.argument("model")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--tokens", required=True, help="How many tokens to sample, e.g. 2M (rounded up to whole sequences).")
@click.option("--length", default=256, show_default=True, type=click.IntRange(min=2),
              help="Tokens per sequence, BOS included.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Sequences at once.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--chat", is_flag=True,
              help="Sample conversations through MODEL's chat template (a user turn, then its answer) instead of "
                   "text from BOS; --length caps each.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, auto.")
@click.option("--revision", help="Hub revision of MODEL.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.pass_context
def sample_command(ctx: click.Context, model: str, output: Path, tokens: str, device: str, revision: str | None,
                   overwrite: bool, **settings) -> None:
    """Sample healing data from MODEL (usually the source) into OUTPUT.npy, for `finetune --data OUTPUT.npy`."""
    from .finetune.options import token_count
    from .finetune.samples import SampleOptions, sample_tokens

    try:
        count = token_count(tokens)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--tokens") from None
    if count < 2:
        raise click.BadParameter("sample at least 2 tokens", param_hint="--tokens")
    path = sample_tokens(model, output, SampleOptions(tokens=count, **settings), device=device, revision=revision,
                         overwrite=overwrite, progress=ctx.obj["progress"])
    click.echo(f"wrote {path}")


@main.command(name="finetune")
@click.argument("model")
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--data", multiple=True, required=True, help=".txt/.jsonl/.npy file, folder of them, or a datasets name (repeatable)."
)
@click.option("--teacher", help="Teacher model (default: the source recorded in MODEL's config).")
@click.option("--tokens", help="Train on this many tokens, e.g. 50M (rounded up to whole steps).")
@click.option("--steps", type=int, help="Optimizer steps (default: one pass over the data).")
@click.option("--seq-len", type=int, help="Packed block length (default: the context, at most 2048).")
@click.option("--batch-size", type=int, help="Blocks per micro-batch on each process.  [default: 8]")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.  [default: 1]")
@click.option("--lr", type=float, help="Peak learning rate.  [default: by model width: 1.28 / hidden size for "
              "attention, 0.024 / √hidden size with --trainable all]")
@click.option("--warmup", type=int, help="Linear warmup steps (default: 5% of the steps), then cosine decay.")
@click.option("--min-lr-ratio", type=float, help="Cosine floor as a fraction of --lr.  [default: 0.1]")
@click.option("--outside-lr-ratio", type=float, help="Peak lr of the trained weights outside attention (MLP, norms, "
              "embeddings, LoRA) as a fraction of --lr.  [default: 1]")
@click.option("--weight-decay", type=float, help="AdamW weight decay.  [default: 0]")
@click.option("--max-grad-norm", type=float, help="Gradient clipping norm (0: none).  [default: 1.0]")
@click.option(
    "--trainable", type=click.Choice(["attention", "attention+norms", "all"]), help="What trains.  [default: attention]"
)
@click.option("--lora-r", type=int, help="Also train LoRA adapters of this rank on the layers outside --trainable.")
@click.option("--lora-alpha", type=float, help="LoRA alpha (default: 2 × rank).")
@click.option("--lora-targets", help="Comma-separated layer names for LoRA.  [default: gate_proj,up_proj,down_proj]")
@click.option("--save-adapter", is_flag=True, help="Also save the peft adapter in OUTPUT/adapter.")
@click.option("--kl-weight", type=float, help="Weight of KL(teacher || student).  [default: 1]")
@click.option("--ce-weight", type=float, help="Weight of next-token cross-entropy.  [default: 0]")
@click.option("--temperature", type=float, help="Distillation temperature.  [default: 1]")
@click.option(
    "--hidden-weight", type=float,
    help="Weight of layer-wise distillation: mean relative squared error of each layer's output.  [default: 0]",
)
@click.option(
    "--attention-weight", type=float,
    help="Weight of layer-local distillation: each attention block, fed the teacher's input to it, matches the "
    "teacher block's output (relative squared error).  [default: 0]",
)
@click.option("--grad-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), help="Training weights.  [default: float32]")
@click.option(
    "--mixed-precision", type=click.Choice(["auto", "no", "bf16", "fp16"]), help="[default: auto: bf16 on GPU, no on CPU]"
)
@click.option("--device", help="auto, cpu, cuda or mps.  [default: auto]")
@click.option("--save-every", type=int, help="Checkpoint every N steps (and at the end) for --resume.")
@click.option("--keep-checkpoints", type=int, help="Keep the newest N checkpoints.  [default: 2]")
@click.option("--resume", is_flag=True, help="Continue from OUTPUT's newest checkpoint (start if there is none).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--eval-data", help="Held-out data (default: the last blocks of --data are held out).")
@click.option("--eval-every", type=int, help="Evaluate every N steps (always before and after).")
@click.option("--eval-fraction", type=float, help="Share of --data held out without --eval-data.  [default: 0.05]")
@click.option("--eval-tokens", help="Evaluate on at most this many tokens.  [default: 262144]")
@click.option("--seed", type=int, help="Data order and initialisation.  [default: 0]")
@click.option("--max-shard-size", help="Largest output shard, e.g. 500MB.  [default: 2GB]")
@click.option("--revision", help="Hub revision of MODEL.")
@click.option("--teacher-revision", help="Hub revision of --teacher.")
@click.option("--dataset-split", help="Split of a datasets name.  [default: train]")
@click.pass_context
def finetune_command(ctx: click.Context, model: str, output: Path, data: tuple[str, ...], **kwargs) -> None:
    """Heal MODEL (a converted folder) by distillation from its source; writes OUTPUT.

    Runs on one device as is, and on many with `accelerate launch -m factorconv finetune ...` or `torchrun`.
    """
    import os

    from .finetune import FinetuneOptions, finetune
    from .finetune.output import summary_line

    given = {k: v for k, v in kwargs.items() if v is not None and v is not False}
    options = FinetuneOptions(model=model, output=output, data=list(data), **given)
    folder = finetune(options, progress=ctx.obj["progress"])
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(summary_line(folder))
