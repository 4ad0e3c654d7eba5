"""The `fedsky` command. Every user-facing error is one clear message and exit code 2."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedsky.errors import FedskyError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated training of language models across clouds.")

SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a job field, e.g. --set rounds=5 --set sites.0.share=2")]


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        from fedsky.metrics import CONSOLE

        handler: logging.Handler = RichHandler(console=CONSOLE, show_path=False, show_time=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, handlers=[handler], force=True)
    logging.getLogger("fedsky").setLevel(level)


def _print_summary(summary: dict) -> None:
    print(f"\nfinal eval loss {summary['final_eval_loss']:.4f}  "
          f"perplexity {summary['final_perplexity']:.1f}  "
          f"accuracy {summary['final_accuracy']:.3f}  "
          f"({summary['rounds_completed']} rounds, {summary['bytes_total'] / 1e6:.1f} MB moved, "
          f"{summary['elapsed_s']:.0f}s)")
    print(f"outputs in {summary['output_dir']}/: summary.json, metrics.jsonl, "
          f"checkpoint.safetensors, model/")


@app.command()
def run(
    job_file: Annotated[Path, typer.Argument(help="The job's TOML file")],
    set_: SetOpt = None,
    transport: Annotated[str | None, typer.Option(
        help="inprocess (default) or grpc: coordinator and one process per site on loopback"
    )] = None,
    centralized: Annotated[bool, typer.Option(
        "--centralized", help="Train on the sites' pooled data in one process instead")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue after the last checkpointed round in output_dir")] = False,
    no_report: Annotated[bool, typer.Option(
        "--no-report", help="Skip writing plots and report.html at the end")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a job: federated (simulated or over gRPC) or centralized."""
    from fedsky.config import load_job

    overrides = list(set_ or [])
    if transport is not None:
        overrides.append(f"transport.kind={transport}")
    job, job_dir = load_job(job_file, overrides)  # fail fast, before the heavy imports
    _setup_logging(verbose)
    from fedsky.runner import run_centralized, run_federated

    if centralized and resume:
        raise FedskyError("--resume applies to federated runs only")
    if centralized:
        summary = run_centralized(job, job_dir)
    else:
        summary = run_federated(job, job_dir, job.transport.kind, resume=resume)
    _print_summary(summary)
    if not no_report:
        _write_report(Path(summary["output_dir"]))


def _write_report(run_dir: Path) -> None:
    """The report after a run; the run succeeded, so a broken report is only a warning."""
    try:
        from fedsky.report import write_report

        print(f"report: {write_report(run_dir).html}")
    except Exception as err:  # noqa: BLE001
        print(f"warning: no report written ({type(err).__name__}: {err}); "
              f"try `fedsky report {run_dir}`", file=sys.stderr)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run's output_dir")],
    out: Annotated[Path | None, typer.Option(
        help="Where to write report.html and plots/ (default: RUN_DIR)")] = None,
) -> None:
    """Write plots (PNG) and a self-contained report.html for a run, finished or not."""
    from fedsky.report import write_report

    rep = write_report(run_dir, out)
    for note in rep.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{rep.html} ({len(rep.plots)} plots in {rep.html.parent / 'plots'})")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="The runs' output_dirs")],
    out: Annotated[Path, typer.Option(
        help="Where to write compare.md and the overlay plots")] = Path("runs/compare"),
) -> None:
    """Overlay runs' eval loss by round, bytes, time and cost; print a table of where each
    ended (markdown, also in OUT/compare.md)."""
    from fedsky.compare import compare_runs, finals_table

    result = compare_runs(run_dirs, out)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(finals_table(run_dirs), end="")  # stdout: only the table, ready to paste
    print(f"{result.table} ({len(result.plots)} plots)", file=sys.stderr)


@app.command()
def coordinator(
    job_file: Annotated[Path, typer.Argument(help="The job's TOML file")],
    set_: SetOpt = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind")] = None,
    tokens: Annotated[Path | None, typer.Option(
        help="JSON file {site: secret}, checked on join besides the certificate; with "
        "transport.insecure and none given, new secrets go to OUTPUT_DIR/site-tokens.json"
    )] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue after the last checkpointed round in output_dir")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the coordinator of a job over gRPC (mutual TLS); sites join with `fedsky worker`."""
    from fedsky.config import load_job

    overrides = list(set_ or []) + ["transport.kind=grpc"]
    if port is not None:
        overrides.append(f"transport.port={port}")
    if host is not None:
        overrides.append(f'transport.host="{host}"')
    job, job_dir = load_job(job_file, overrides)
    _setup_logging(verbose)
    from fedsky.runner import new_tokens, run_federated

    site_tokens: dict[str, str] | None = None
    if tokens is not None:
        try:
            site_tokens = json.loads(tokens.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FedskyError(f"--tokens {tokens}: cannot read a JSON object: {err}") from None
        missing = [s.name for s in job.sites if s.name not in site_tokens]
        if missing:
            raise FedskyError(f"--tokens {tokens}: no secret for site(s) {', '.join(missing)}")
    elif job.transport.insecure:  # plaintext: a token is all a site has to prove who it is
        site_tokens = new_tokens(job)
        out = Path(job.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "site-tokens.json"
        path.write_text(json.dumps(site_tokens, indent=2))
        path.chmod(0o600)
        print(f"site secrets written to {path} (mode 600): give each site only its own",
              file=sys.stderr)
    _print_summary(run_federated(job, job_dir, "grpc", tokens=site_tokens, resume=resume,
                                 external=True))


@app.command()
def worker(
    coordinator: Annotated[str, typer.Option("--coordinator", help="HOST:PORT")],
    site: Annotated[str, typer.Option("--site", help="This site's name in the job")],
    tls_ca: Annotated[Path | None, typer.Option(
        help="The project CA (PEM): the coordinator must present a certificate it issued")] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        help="This site's certificate (PEM, from `fedsky certs site NAME`)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="This site's private key (PEM)")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Plaintext, no TLS (the coordinator must run insecure too): "
        "trusted networks only; needs the site's secret")] = False,
    token_file: Annotated[Path | None, typer.Option(
        help="File holding this site's secret (default: $FEDSKY_TOKEN)")] = None,
    data: Annotated[str | None, typer.Option(
        help="This site's own data file, instead of the job's data for it")] = None,
    retries: Annotated[int, typer.Option(
        help="Connection attempts (waits double up to 30 s) before giving up")] = 10,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run one site: dial the coordinator, train on local data each round, send updates.

    Under `torchrun --nproc-per-node N`, the N processes are one site (DDP); rank 0 dials."""
    _setup_logging(verbose)
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedskyError(f"--coordinator {coordinator!r}: expected HOST:PORT, "
                          "e.g. coord.example.org:50051")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as err:
            raise FedskyError(f"--token-file: {err}") from None
    else:
        token = os.environ.get("FEDSKY_TOKEN", "")
    from fedsky.certs import TlsFiles, peer_of

    tls = None
    if insecure:
        if tls_ca or tls_cert or tls_key:
            raise FedskyError("--insecure turns TLS off; drop it or the --tls-* files")
        if not token:
            raise FedskyError("--insecure: no site secret: set FEDSKY_TOKEN or pass --token-file")
        logging.getLogger("fedsky").warning("--insecure: plaintext, updates cross the network "
                                            "unencrypted")
    elif tls_ca is None or tls_cert is None or tls_key is None:
        raise FedskyError("no certificate: pass --tls-ca, --tls-cert and --tls-key (from "
                          "`fedsky certs site NAME`), or --insecure for plaintext")
    else:
        try:
            named = peer_of(tls_cert.read_bytes()).name
        except (OSError, ValueError) as err:
            raise FedskyError(f"--tls-cert {tls_cert}: not a readable certificate: {err}") from None
        if named != site:
            raise FedskyError(f"--tls-cert {tls_cert} is site {named!r}'s, not {site!r}'s")
        tls = TlsFiles(str(tls_ca), str(tls_cert), str(tls_key))
    from fedsky.distributed import init_from_env, serve_site_group
    from fedsky.site import site_factory
    from fedsky.transport.grpc_worker import serve_site

    group = init_from_env()  # under torchrun: one rank of a multi-process site
    if group is not None:
        serve_site_group(coordinator, site, data, group, token=token, tls=tls,
                         connect_retries=retries)
        return
    serve_site(coordinator, site, site_factory(data), token=token, tls=tls,
               connect_retries=retries)


certs_app = typer.Typer(no_args_is_help=True, help="Provision the project CA and certificates.")
app.add_typer(certs_app, name="certs")
CertsDir = Annotated[Path, typer.Option("--dir", help="The project's certificate directory")]


@certs_app.command("init")
def certs_init(directory: Annotated[Path, typer.Argument(help="Where to create the CA")],
               project: Annotated[str, typer.Option(help="Name in the CA's subject")] = "fedsky",
               ) -> None:
    """Create a project CA (ca.pem, ca.key) and an empty revocation list."""
    from fedsky.certs import init_ca

    print(f"project CA: {init_ca(directory, project)} (keep {directory / 'ca.key'} offline)")


@certs_app.command("site")
def certs_site(name: Annotated[str, typer.Argument(help="The site's name in the job")],
               directory: CertsDir = Path("pki")) -> None:
    """Issue a site's client certificate: sites/NAME.pem and sites/NAME.key."""
    from fedsky.certs import issue_site

    cert = issue_site(directory, name)
    print(f"{cert} and {cert.with_suffix('.key')}: give them, with {directory / 'ca.pem'}, "
          f"to site {name} only")


@certs_app.command("coordinator")
def certs_coordinator(
    host: Annotated[list[str], typer.Option(
        "--host", help="A host name or IP address sites dial (repeat for several)")],
    directory: CertsDir = Path("pki"),
) -> None:
    """Issue the coordinator's server certificate: coordinator.pem and coordinator.key."""
    from fedsky.certs import issue_coordinator

    print(f"{issue_coordinator(directory, host)}: valid for {', '.join(host)}")


@certs_app.command("revoke")
def certs_revoke(name: Annotated[str, typer.Argument(help="The site to shut out")],
                 directory: CertsDir = Path("pki")) -> None:
    """Add a site's certificate to revoked.txt; the coordinator refuses it from its next
    connection on (set transport.revocation_list to that file)."""
    from fedsky.certs import revoke

    serial = revoke(directory, name)
    print(f"revoked site {name} (serial {serial:x}) in {directory / 'revoked.txt'}")


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="A run's output_dir, run with audit = true")],
    candidates: Annotated[int, typer.Option(
        help="Random secrets each canary is ranked against (exposure tops out at log2(N+1))"
    )] = 1000,
    records: Annotated[int, typer.Option(
        help="Members and held-out records per site for membership inference")] = 256,
    json_out: Annotated[bool, typer.Option("--json", help="Print the JSON, not the table")] = False,
) -> None:
    """Attack a recorded run as the coordinator: token sets from the updates, canary exposure
    and membership inference on the released model, and each site's data leakage rate
    (written to RUN_DIR/audit/report.json)."""
    from fedsky.audit import audit_run, format_table

    result = audit_run(run_dir, candidates, records)
    print(json.dumps(result, indent=2) if json_out else format_table(result), end="")


privacy_app = typer.Typer(no_args_is_help=True, help="Differential privacy tools.")
app.add_typer(privacy_app, name="privacy")


@privacy_app.command("plan")
def privacy_plan(
    epsilon: Annotated[float, typer.Option(help="Target epsilon")],
    data_size: Annotated[int, typer.Option(help="Records (sequences) at the site")],
    batch: Annotated[int, typer.Option(help="Expected batch (training.batch_size)")],
    steps: Annotated[int, typer.Option(help="DP-SGD steps in all: rounds x local_steps")],
    delta: Annotated[float, typer.Option(help="Target delta")] = 1e-5,
    accountant: Annotated[str, typer.Option(help="pld (tighter) or rdp")] = "pld",
) -> None:
    """Print the DP-SGD noise multiplier that keeps a site within (epsilon, delta).

    The line printed is TOML for the job's privacy.dp_sgd table."""
    if accountant not in ("pld", "rdp"):
        raise FedskyError(f"--accountant {accountant!r}: use pld or rdp")
    if not (epsilon > 0 and 0 < delta < 1 and steps > 0 and 0 < batch <= data_size):
        raise FedskyError("need --epsilon > 0, 0 < --delta < 1, --steps > 0 and "
                          "0 < --batch <= --data-size")
    from fedsky.privacy import Mechanism, plan_noise
    from fedsky.privacy import epsilon as spent

    q = batch / data_size
    z = math.ceil(plan_noise(epsilon, delta, q, steps, accountant) * 1e4) / 1e4  # round up
    eps = spent([Mechanism(q, z, steps)], delta, accountant)  # type: ignore[arg-type]
    print(f"noise_multiplier = {z:.4f}  # {accountant}: epsilon {eps:.3f} at delta {delta:g}; "
          f"sample rate {q:.4g}, {steps} steps")


def main() -> None:
    import click

    try:
        code = app(standalone_mode=False)
    except FedskyError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as err:  # usage errors: exit 2 with click's message
        err.show()
        sys.exit(err.exit_code)
    except (click.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
