"""The `factorconv` command line: each command validates its input and calls one library function."""

import logging
from pathlib import Path

import click
from pydantic import ValidationError
from transformers.utils import logging as transformers_logging

from . import __version__
from .errors import FactorConvError


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _options_error(err: ValidationError) -> str:
    first = err.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    where = ".".join(str(p) for p in first["loc"])
    return f"invalid {where}: {message}" if where else message


@click.group()
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
    "--to", "target", type=click.Choice(["tpa", "mfa", "mfa-kr"]), default="tpa", show_default=True, help="Target attention."
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
@click.option("--dtype", default="auto", show_default=True, help="auto (the source's), float32, bfloat16, float16.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard, e.g. 500MB.")
@click.option("--device", default="cpu", show_default=True, help="Where to run the factorization: cpu, cuda, auto.")
@click.option("--revision", help="Hub branch, tag or commit of SOURCE.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.pass_context
def convert(ctx: click.Context, source: str, output: Path, target: str, **kwargs) -> None:
    """Convert SOURCE (local folder or Hub id) into a factorized model written to OUTPUT."""
    from .convert import convert as run_convert
    from .recipe import ConvertOptions

    try:
        options = ConvertOptions(source=source, output=output, to=target, **kwargs)
    except ValidationError as err:
        _fail(_options_error(err))
    try:
        folder = run_convert(options, progress=ctx.obj["progress"])
    except FactorConvError as err:
        _fail(str(err))
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
    from .convert.pipeline import resolve_device
    from .evaluate.report import evaluate, format_table

    try:
        rows = evaluate(model, data, compare, device=resolve_device(device), progress=ctx.obj["progress"], **kwargs)
    except FactorConvError as err:
        _fail(str(err))
    click.echo(format_table(rows))
