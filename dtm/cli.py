"""The ``dtm`` command: ``match``, ``demo``, ``template``, ``peaks``, ``refine``, ``report``,
``browse``, ``import-leopard``.

User mistakes (:class:`dtm.errors.DtmError`) print one line on stderr and exit with 2. A
``dtm match`` run says in one or two lines what stopped it, what it saved and the command
that resumes it, and exits with a status of its own (:data:`EXIT_STATUSES`); its traceback
goes to a log file in ``output_dir``. Elsewhere nothing else is caught, so a bug keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shlex
import signal
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dtm.errors import (
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_STOPPED,
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    DtmError,
    RunStopped,
)

#: The exit statuses of ``dtm match`` (shown by ``dtm match --help``).
EXIT_STATUSES = {
    EXIT_OK: "every micrograph searched (or already done)",
    EXIT_BUG: "an unexpected failure (a bug): its traceback is in output_dir/dtm-error.log",
    EXIT_USER_ERROR: "a bad input, configuration or command line; nothing was run",
    EXIT_SOME_FAILED: "finished, but some micrographs failed (listed on stderr and in "
    "run.json); fix them and rerun with --resume",
    EXIT_STOPPED: "stopped mid-run by the cluster or the output disk (scheduler or workers "
    "lost, disk full, no progress); continue with --resume",
    EXIT_INTERRUPTED: "interrupted by Ctrl-C (SIGINT); continue with --resume",
    EXIT_TERMINATED: "stopped by SIGTERM (e.g. a batch job's time limit); continue with --resume",
}

#: The values of ``cluster.kind`` (kept here so that ``dtm --help`` imports no configuration
#: code; a test checks them against :class:`dtm.config.ClusterConfig`).
CLUSTER_KINDS = ["local", "address", "slurm", "pbs", "kubernetes", "gpu-local"]


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    value = _at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be <= 65535, got {value}")
    return value


def _number(above: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number, ``> above`` when given."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be > {above:g}, got {value:g}")
        return value

    return parse


def _cluster_options(
    parser: argparse.ArgumentParser, device: bool = True, kind: bool = True
) -> None:
    if kind:
        parser.add_argument(
            "--cluster",
            choices=CLUSTER_KINDS,
            help="where the workers come from (overrides cluster.kind of the configuration)",
        )
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running dask scheduler (tcp://host:8786) or its "
        "scheduler file; default: start an embedded local cluster",
    )
    parser.add_argument(
        "--workers", type=_at_least(1), metavar="N", help="workers of a local cluster"
    )
    if device:
        parser.add_argument("--device", choices=["cpu", "gpu"], help="array backend of the workers")


def _match(args: argparse.Namespace) -> int:
    from dtm.config import load_match_config
    from dtm.io.runlog import keep_logs
    from dtm.programs.match import run_match

    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    if args.cluster:
        overrides["cluster.kind"] = args.cluster
    config = load_match_config(args.config, overrides or None)
    for line in config.notices:
        print(f"notice: {line}")
    # For the rest of the command (a client closing after a lost scheduler still logs):
    # Dask's tracebacks go to the log file only.
    args.restore_logs = keep_logs()
    # Another program on the default dashboard port: the dashboard moves to a free one,
    # and the link printed says where; the warning would only add a line to the terminal.
    warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
    outcome = run_match(
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        strict=args.strict,
        scheduler_address=args.scheduler,
        n_workers=args.workers,
        device=args.device,
    )
    failed = outcome.failed
    if not failed:
        return EXIT_OK
    sys.stdout.flush()
    for plan in failed:
        print(f"dtm: failed: {plan.name}: {plan.error}", file=sys.stderr)
    print(
        f"dtm: {len(failed)} of {len(outcome.plans)} micrograph(s) failed (listed in "
        f"{outcome.output_dir / 'run.json'}); after fixing them: {_resume_command(args)}",
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED


def _resume_command(args: argparse.Namespace) -> str:
    """The command that resumes this run: the same arguments, with ``--resume``."""
    argv = [arg for arg in args.argv if arg not in ("--resume", "--overwrite")]
    return shlex.join(["dtm", *argv, "--resume"])


def _demo(args: argparse.Namespace) -> None:
    from dtm.programs.demo import run_demo

    run_demo(
        Path(args.out),
        n_workers=args.workers,
        scheduler_address=args.scheduler,
        model=not args.synthetic,
    )


def _template(args: argparse.Namespace) -> None:
    from dtm.config.base import validate_options
    from dtm.config.template import TemplateSimulation
    from dtm.programs.template import template_command

    given = {
        "b_factor_scaling": args.b_factor_scale,
        "additional_b_factor": args.add_b_factor,
        "dose_weighting": args.dose_weighting,
        "mtf_path": args.mtf and str(Path(args.mtf).absolute()),
        "dqe_path": args.dqe and str(Path(args.dqe).absolute()),
        "oversampling": args.oversampling,
        "waters": False if args.no_waters else None,
    }
    settings = validate_options(
        TemplateSimulation, {key: value for key, value in given.items() if value is not None}
    )
    template_command(
        args.model,
        args.output,
        pixel_size=args.pixel_size,
        box=args.box,
        voltage=args.voltage,
        settings=settings,
        overwrite=args.overwrite,
        scheduler_address=args.scheduler,
    )


def _peaks(args: argparse.Namespace) -> None:
    from dtm.config.base import validate_options
    from dtm.config.match import PeaksConfig
    from dtm.programs.peaks import repick, threshold_summary

    given = {
        "metric": args.metric,
        "false_positives": args.false_positives,
        "z_score_cutoff": args.z_cutoff,
        "p_value_cutoff": args.p_value_cutoff,
        "min_distance_pixels": args.min_distance,
        "border_pixels": args.border,
    }
    picking = validate_options(PeaksConfig, {k: v for k, v in given.items() if v is not None})
    table = repick(args.results_dir, picking)
    summary = threshold_summary(args.results_dir)
    print(f"{len(table)} peaks above {summary} written to {args.results_dir}/peaks.csv")


def _report(args: argparse.Namespace) -> None:
    from dtm.programs.report import write_report

    path = write_report(args.results_dir, out=args.out)
    print(f"report written to {path}")


def _browse(args: argparse.Namespace) -> None:
    from dtm.programs.browse import browse

    browse(
        args.results_dir,
        port=args.port,
        address=args.address,
        show=args.show,
        allow_websocket_origin=args.allow_websocket_origin,
    )


def _refine(args: argparse.Namespace) -> None:
    from dtm.config import load_refine_config
    from dtm.programs.refine import refine_template

    config = load_refine_config(
        args.config, {"cluster.kind": args.cluster} if args.cluster else None
    )
    for line in config.notices:
        print(f"notice: {line}")
    refine_template(
        config, scheduler_address=args.scheduler, n_workers=args.workers, overwrite=args.overwrite
    )


def _import_leopard(args: argparse.Namespace) -> None:
    from dtm.programs.import_leopard import import_leopard

    import_leopard(args.sources, args.output_dir, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dtm`` command."""
    parser = argparse.ArgumentParser(
        prog="dtm", description="2D template matching for cryo-EM, distributed with Dask."
    )
    from dtm import __version__

    parser.add_argument("--version", action="version", version=f"dtm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    statuses = "\n".join(
        textwrap.fill(
            text,
            79,
            initial_indent=f"  {code:<4} ",
            subsequent_indent=" " * 7,
            break_on_hyphens=False,
        )
        for code, text in EXIT_STATUSES.items()
    )
    match = sub.add_parser(
        "match",
        help="search micrographs for a template",
        description="Search micrographs for a template (see docs/many-micrographs.md).",
        epilog=f"exit status:\n{statuses}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    match.add_argument("config", help="YAML configuration (dtm or Leopard-EM match_template)")
    match.add_argument("--output-dir", help="override output_dir of the configuration")
    mode = match.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted run")
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace earlier results (removes only the outputs its job.json records)",
    )
    match.add_argument(
        "--strict",
        action="store_true",
        help="refuse the run at the first bad micrograph (missing or unreadable) instead "
        "of skipping it, and a header pixel size that differs from the configuration's",
    )
    _cluster_options(match)
    match.set_defaults(func=_match)

    demo = sub.add_parser(
        "demo", help="simulate a micrograph and run the whole pipeline, from an atomic model"
    )
    demo.add_argument("--out", default="dtm-demo", help="output directory (default: dtm-demo)")
    demo.add_argument(
        "--synthetic",
        action="store_true",
        help="plant a synthetic blob and search with its template, instead of the bundled "
        "atomic model (PDB 7DDO) that the search makes its template from",
    )
    _cluster_options(demo, device=False, kind=False)
    demo.set_defaults(func=_demo)

    template = sub.add_parser(
        "template",
        help="simulate a template from an atomic model (PDB or mmCIF)",
        description="Simulate a template from an atomic model: the electrostatic potential "
        "from 5-Gaussian scattering factors (Peng 1996) with each atom's B-factor, centred "
        "on the model's centre (see docs/from-a-model.md).",
    )
    template.add_argument("model", help="PDB or mmCIF file (.gz too)")
    template.add_argument(
        "--pixel-size", type=_number(above=0), required=True, metavar="Å", help="voxel size"
    )
    template.add_argument(
        "--box",
        type=_at_least(8),
        metavar="N",
        help="edge of the volume (default: the model's diameter plus 20 Å, even)",
    )
    template.add_argument("--output", required=True, metavar="MRC", help="template to write")
    template.add_argument(
        "--voltage", type=_number(above=0), default=300.0, metavar="KV", help="default 300"
    )
    template.add_argument(
        "--b-factor-scale", type=_number(), metavar="S", help="multiply the B-factors (1)"
    )
    template.add_argument(
        "--add-b-factor", type=_number(), metavar="Å²", help="add to the B-factors (0)"
    )
    template.add_argument(
        "--dose-weighting",
        type=_number(),
        nargs=2,
        metavar=("START", "END"),
        help="weight by the signal left over this exposure, e⁻/Å² (Grant & Grigorieff 2015)",
    )
    template.add_argument("--mtf", metavar="FILE", help="multiply by this detector MTF")
    template.add_argument("--dqe", metavar="FILE", help="weight by √DQE of this curve")
    template.add_argument(
        "--oversampling", type=_at_least(1), metavar="U", help="fine grid factor (auto)"
    )
    template.add_argument("--no-waters", action="store_true", help="leave out water molecules")
    template.add_argument("--overwrite", action="store_true", help="replace --output")
    template.add_argument(
        "--scheduler", metavar="ADDRESS", help="compute on this running dask scheduler"
    )
    template.set_defaults(func=_template)

    peaks = sub.add_parser("peaks", help="re-pick peaks from the results of dtm match")
    peaks.add_argument("results_dir", help="output directory of dtm match")
    cut = peaks.add_mutually_exclusive_group()
    cut.add_argument(
        "--false-positives",
        type=_number(above=0),
        metavar="F",
        help="expected false positives per micrograph (default 1)",
    )
    cut.add_argument("--z-cutoff", type=_number(), metavar="Z", help="fixed cut-off of a z metric")
    cut.add_argument(
        "--p-value-cutoff",
        type=_number(above=0),
        metavar="L",
        help="cut-off of the pvalue metric, as -ln p (default 8)",
    )
    peaks.add_argument(
        "--metric",
        choices=["detection_z", "scaled_mip", "mip", "pvalue", "gev"],
        help="what to threshold (default detection_z; see docs/conventions.md#detection)",
    )
    peaks.add_argument(
        "--min-distance",
        type=_number(above=0),
        metavar="PIXELS",
        help="minimum distance between peaks (pixels)",
    )
    peaks.add_argument(
        "--border",
        type=_at_least(0),
        default=0,
        metavar="PIXELS",
        help="exclude peaks this close to the map edge",
    )
    peaks.set_defaults(func=_peaks)

    report = sub.add_parser("report", help="write an HTML report of a dtm match run")
    report.add_argument("results_dir", help="output directory of dtm match (path or fsspec URL)")
    report.add_argument(
        "--out", metavar="HTML", help="report file (default RESULTS_DIR/report.html)"
    )
    report.set_defaults(func=_report)

    browse = sub.add_parser("browse", help="pan and zoom the maps and peaks in a web browser")
    browse.add_argument("results_dir", help="output directory of dtm match (path or fsspec URL)")
    browse.add_argument("--port", type=_port, default=5006, help="HTTP port (0 picks a free one)")
    browse.add_argument(
        "--address", default="localhost", help="interface to listen on (default: localhost)"
    )
    browse.add_argument(
        "--allow-websocket-origin",
        action="append",
        metavar="HOST[:PORT]",
        help="host of a page allowed to connect (e.g. through an SSH tunnel); repeatable; "
        "requests naming any other Host than these, --address and localhost are refused",
    )
    browse.add_argument("--show", action="store_true", help="open the page in a web browser")
    browse.set_defaults(func=_browse)

    refine = sub.add_parser("refine", help="refine particles from a results table")
    refine.add_argument("config", help="YAML configuration (dtm or Leopard-EM refine_template)")
    refine.add_argument(
        "--overwrite", action="store_true", help="replace refined tables at output_path"
    )
    _cluster_options(refine, device=False)
    refine.set_defaults(func=_refine)

    leopard = sub.add_parser(
        "import-leopard",
        help="make a dtm output directory of Leopard-EM's maps and table",
        description="Read Leopard-EM's eight match_template maps (named by its results "
        "tables or configurations) into OUTPUT_DIR/results.zarr and OUTPUT_DIR/maps/, its "
        "standard-deviation map squared into dtm's variance; then dtm peaks, report, browse "
        "and refine work on OUTPUT_DIR (see docs/leopard-cistem.md).",
    )
    leopard.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="Leopard-EM results table (.csv) or match_template configuration (.yaml)",
    )
    leopard.add_argument("--output-dir", required=True, help="the dtm output directory to write")
    leopard.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results in OUTPUT_DIR (removes only the outputs its job.json records)",
    )
    leopard.set_defaults(func=_import_leopard)
    return parser


@contextlib.contextmanager
def _reliable_interrupts() -> Iterator[None]:
    """Ctrl-C that Python dropped is sent again (main thread only).

    A KeyboardInterrupt raised in a garbage-collector or weakref callback or a ``__del__``
    (distributed runs Python code in all three) cannot propagate: Python reports it to
    ``sys.unraisablehook`` as "Exception ignored" and the search went on. Here the hook
    sends SIGINT to the main thread again 50 ms later, which also wakes a blocking wait.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = sys.unraisablehook
    main_thread = threading.main_thread().ident

    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            threading.Timer(0.05, signal.pthread_kill, (main_thread, signal.SIGINT)).start()
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[list[bool]]:
    """SIGTERM (what Slurm and ``kill`` send) stops the run as Ctrl-C does: what is
    finished is recorded, the cluster is closed. Yields a flag set when it came."""
    received: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        received.append(True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dtm`` command; returns the exit status."""
    in_process = argv is not None  # called from Python: leave its logging as it was
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return _main(args)
    finally:
        if in_process:
            for logger, handlers, propagate in getattr(args, "restore_logs", []):
                logger.handlers, logger.propagate = handlers, propagate


def _main(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], int | None] = args.func
    terminated: list[bool] = []
    try:
        with _reliable_interrupts(), _sigterm_as_interrupt() as terminated:
            return func(args) or EXIT_OK
    except DtmError as exc:
        print(f"dtm: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunStopped as exc:
        sys.stdout.flush()
        bug = exc.what.startswith("unexpected failure")
        log = f" (details in {exc.log})" if exc.log else ""
        print(f"dtm: error: {exc.what}{log}", file=sys.stderr)
        print(f"dtm: {exc.saved}; continue with: {_resume_command(args)}", file=sys.stderr)
        return EXIT_BUG if bug else EXIT_STOPPED
    except KeyboardInterrupt as exc:
        sys.stdout.flush()
        what = "stopped by SIGTERM" if terminated else "interrupted"
        if args.command != "match":
            print(f"dtm: {what}", file=sys.stderr)
        else:
            saved = getattr(exc, "saved", "")
            if saved:
                print(f"dtm: {what}; {saved}", file=sys.stderr)
            print(f"dtm: {what}; continue with: {_resume_command(args)}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
